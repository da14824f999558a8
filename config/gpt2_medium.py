# GPT-2 medium (350M with the GPT-2 vocabulary) for GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_medium.py
out_dir = 'out-gpt2-medium'
dataset = 'stdlib_gpt2'
n_layer = 24
n_head = 16
n_embd = 1024
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 64
max_iters = 60000
# AdamW and cosine, as GPT-2 was tuned (Muon at this size: measured for speed, bench/bench_gpu.py, not yet for loss)
optimizer = 'adamw'
lr_schedule = 'cosine'
warmup_iters = 2000
learning_rate = 3e-4
min_lr = 3e-5
beta2 = 0.95
eval_interval = 1000
eval_iters = 100
# a checkpoint (weights + AdamW) is 4.3 GB: latest + backup + best + 3 step_ + 2 epoch_ files <= 35 GB
ckpt_interval = 100
rolling_interval = 1000
keep_last = 3
keep_epochs = 2
compile = True
