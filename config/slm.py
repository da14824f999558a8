# GPT-2 small (124M with the GPT-2 vocabulary) for GPUs:
#   python prepare.py --tokenizer=gpt2 --dataset=stdlib_gpt2   (or your corpus)
#   torchrun --standalone --nproc_per_node=4 train.py config/slm.py
out_dir = 'out-slm'
dataset = 'stdlib_gpt2'
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = True
# global batch: 12 * 40 = 480 sequences (~0.5M tokens), split over any number of processes
batch_size = 12
gradient_accumulation_steps = 40
max_iters = 60000
# AdamW and cosine, as GPT-2 was tuned (Muon at this size: measured for speed, bench/bench_gpu.py, not yet for loss)
optimizer = 'adamw'
lr_schedule = 'cosine'
warmup_iters = 2000
learning_rate = 6e-4
min_lr = 6e-5
beta2 = 0.95
eval_interval = 1000
eval_iters = 100
log_interval = 10
# a checkpoint (weights + AdamW) is 1.5 GB: latest + backup + best + 5 step_ + 3 epoch_ files <= 17 GB
ckpt_interval = 250  # ~3 min on 4 A100s; a 1.5 GB save takes ~5 s
rolling_interval = 1000
keep_last = 5
keep_epochs = 3
compile = True
