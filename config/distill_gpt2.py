# Scavenging Hyena at GPT-2 scale: the pretrained GPT-2 124M -> an all-Hyena student of the same shape, on
# OpenWebText, 8 GPUs on one node.
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 distill.py config/distill_gpt2.py
# 12 batch x 1024 block x 40 gradient accumulation (split over the 8 ranks) = ~491K tokens per iteration.
# Budget: align 1,200 iterations (0.6B tokens, 100 per layer), kd 5,000 (2.5B): about what MOHAWK spent
# distilling Phi-1.5 (3B tokens), under 1% of GPT-2's pre-training. The scratch baseline gets the same.
out_dir = 'out-distill-gpt2'
teacher = 'gpt2'  # or a local folder holding a Hugging Face GPT-2 checkpoint
dataset = 'openwebtext'

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

align_iters = 1200
align_lr = 1e-3
align_mode = 'progressive'
kd_iters = 5000
kd_lr = 6e-4
kd_alpha = 0.5
kd_temperature = 1.0
scratch_iters = -1
scratch_lr = 6e-4
warmup_iters = 100

eval_interval = 500
eval_iters = 100
