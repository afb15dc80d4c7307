"""On storage: names under the root, the manifest, the state tree, metrics files and the codecs.
Everything a reader needs to interpret a checkpoint, and nothing that moves bytes."""
