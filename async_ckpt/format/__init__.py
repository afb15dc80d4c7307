"""On storage: names under the root, the manifest, the state tree, metrics files and the codecs.
Everything a reader needs to interpret a checkpoint; the only I/O here is listing step folders
and reading manifests and metrics files (`names`, `metrics_file`)."""
