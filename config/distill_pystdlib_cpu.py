# The embedded demo's distillation (CPU, ~3 minutes on 2 cores): the teacher of
# config/train_teacher_pystdlib_cpu.py -> an all-Hyena student, progressive align then KD, and the
# same student trained from scratch on the same tokens; report in out_dir/report.md.
#   python distill.py config/distill_pystdlib_cpu.py
out_dir = 'out-distill-pystdlib-cpu'
teacher = 'out-teacher-pystdlib-cpu/ckpt.pt'
dataset = 'pystdlib'
device = 'cpu'
compile = False  # inductor's build takes longer than this whole run on CPU

batch_size = 12  # x 128 tokens (the teacher's block_size)
align_iters = 32  # progressive: 8 per layer
align_lr = 3e-3
kd_iters = 40  # each step runs the teacher too: ~2.3x a plain step on CPU
kd_lr = 2e-3
kd_alpha = 0.5
kd_temperature = 1.0
scratch_iters = -1  # as many as align + kd: 72 iterations, ~110K tokens
scratch_lr = 2e-3
warmup_iters = 5

eval_interval = 20
eval_iters = 6
