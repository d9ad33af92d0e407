# A GPT-2-small-shaped teacher (12 layers, 12 heads, 768 wide, 1024 context; ~124M parameters) on the
# embedded corpus, for one GPU (sized for an H200: bf16 autocast + torch.compile).
#   python data/pystdlib/prepare.py && python train_teacher.py config/train_teacher_pystdlib_gpu.py
# The corpus holds ~15M training tokens; 2,000 iterations of 64K tokens are ~9 epochs, so dropout is on
# and val loss is what to watch (ckpt.pt keeps the best one: always_save_checkpoint = False).
out_dir = 'out-teacher-pystdlib-gpu'
dataset = 'pystdlib'
device = 'cuda'
compile = True

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.1
bias = False

batch_size = 16
gradient_accumulation_steps = 4  # 16 x 1024 x 4 = 65,536 tokens per iteration
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1

eval_interval = 200
eval_iters = 50
log_interval = 10
always_save_checkpoint = False
