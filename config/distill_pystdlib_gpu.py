# GPU-scale Scavenging Hyena on one H200: the GPT-2-small-shaped teacher of
# config/train_teacher_pystdlib_gpu.py -> an all-Hyena student of the same shape; bf16 + torch.compile.
#   python distill.py config/distill_pystdlib_gpu.py
#   torchrun --standalone --nproc_per_node=2 distill.py config/distill_pystdlib_gpu.py
# For a larger corpus (e.g. a Python installation's site-packages, 100M+ tokens):
#   python data/textfiles/prepare.py --input=/path/to/site-packages --extensions=.py --out_dir=data/sitepackages
#   python distill.py config/distill_pystdlib_gpu.py --dataset=sitepackages --teacher=...
out_dir = 'out-distill-pystdlib-gpu'
teacher = 'out-teacher-pystdlib-gpu/ckpt.pt'
dataset = 'pystdlib'
device = 'cuda'
compile = True

batch_size = 16
gradient_accumulation_steps = 4  # 16 x 1024 x 4 = 65,536 tokens per iteration
align_iters = 240  # progressive: 20 per layer, ~1.3M tokens each
align_lr = 1e-3
kd_iters = 600  # ~39M tokens
kd_lr = 6e-4
scratch_iters = -1  # 840 iterations, ~55M tokens, the same batches
scratch_lr = 6e-4
warmup_iters = 20

eval_interval = 100
eval_iters = 20
