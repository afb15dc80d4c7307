"""Your own Accelerate loop, checkpointed with async_ckpt.integrations.accelerate.

    accelerate launch --multi_gpu --num_processes 2 examples/trainers/accelerate_loop.py [ROOT]
"""
import torch
from accelerate import Accelerator
from common import Pairs, adamw, model, root, warmup
from torchdata.stateful_dataloader import StatefulDataLoader

import async_ckpt as ac
from async_ckpt.integrations.accelerate import components, resume

accelerator = Accelerator(cpu=not torch.cuda.is_available())
net = model()
optimizer = adamw(net.parameters())
net, optimizer, scheduler = accelerator.prepare(net, optimizer, warmup(optimizer))
gen = torch.Generator().manual_seed(accelerator.process_index)
loader = StatefulDataLoader(Pairs(), batch_size=8, sampler=ac.ResumableSampler(Pairs(), seed=0), generator=gen)
ckpt = ac.AsyncCheckpointer(root("accelerate_loop"), components(
    accelerator, model=net, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
    generators={"loader": gen}), keep_last=2)
step, batches = resume(ckpt, loader)
while step < 200:
    step += 1
    x, y = (t.to(accelerator.device) for t in next(batches))
    loss = torch.nn.functional.mse_loss(net(x), y)
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    if step % 50 == 0:
        ckpt.save(step)                # every rank, the same steps
ckpt.close()
