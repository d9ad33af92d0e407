# A small GPT teacher on the embedded corpus (data/pystdlib: the Python standard library's source) that
# trains in about 6 minutes on 2 CPU cores and visibly learns (val loss 10.3 -> ~3.3).
#   python data/pystdlib/prepare.py && python train_teacher.py config/train_teacher_pystdlib_cpu.py
# Most of the time goes to the 50304-way output layer and its ~400 MB of logits per step.
out_dir = 'out-teacher-pystdlib-cpu'
dataset = 'pystdlib'
device = 'cpu'
compile = False  # building with inductor takes longer than this whole run on CPU

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
bias = False

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 240  # 240 x 2,048 = 492K tokens; ~1.3 s/iteration on 2 idle cores: ~6 minutes in all
lr_decay_iters = 240
warmup_iters = 10
learning_rate = 2e-3  # a small model on a short run takes a high rate
min_lr = 2e-4
weight_decay = 0.1

eval_interval = 120  # evaluations at 0, 120 and 240
eval_iters = 8
log_interval = 1
