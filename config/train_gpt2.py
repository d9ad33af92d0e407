# GPT-2 (124M) on OpenWebText, nanoGPT's recipe: 8 GPUs on one node, ~4 days on A100s to loss ~2.85.
#   python data/openwebtext/prepare.py     (needs network and the `datasets` package)
#   torchrun --standalone --nproc_per_node=8 train_teacher.py config/train_gpt2.py
# 12 batch x 1024 block x 40 gradient accumulation (split over the 8 ranks) = ~491K tokens per iteration;
# 600,000 iterations = ~300B tokens.
out_dir = 'out-gpt2'
dataset = 'openwebtext'

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False

batch_size = 12
gradient_accumulation_steps = 5 * 8
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10
