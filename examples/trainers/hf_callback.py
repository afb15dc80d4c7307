"""A Hugging Face Trainer saving through async_ckpt (a 2-layer GPT-2 built from a config).

    python examples/trainers/hf_callback.py [ROOT]
    torchrun --nproc-per-node 2 examples/trainers/hf_callback.py [ROOT]
"""
import torch
import transformers
from common import root

from async_ckpt.integrations.hf import AsyncCheckpointCallback

transformers.set_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128,
                                                             n_positions=32))
ids = torch.randint(0, 128, (256, 32), generator=torch.Generator().manual_seed(1))
rows = [{"input_ids": r, "labels": r} for r in ids]
args = transformers.TrainingArguments(output_dir="hf_output", max_steps=100, per_device_train_batch_size=8,
                                      save_strategy="steps", save_steps=25, eval_strategy="steps",
                                      eval_steps=25, use_cpu=not torch.cuda.is_available(), report_to=[])
callback = AsyncCheckpointCallback(root("hf"), keep_last=2, keep_best=1, best_metric="eval_loss")
trainer = transformers.Trainer(model=model, args=args, train_dataset=rows[:224], eval_dataset=rows[224:],
                               callbacks=[callback])
trainer.train(resume_from_checkpoint=callback.resume(trainer))
