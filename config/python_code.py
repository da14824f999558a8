# A known small code model: 4 layers, 4 heads, 256 wide, block 256 (~6M parameters with vocab 8192).
#   python prepare.py && python train.py config/python_code.py
out_dir = 'out-python-code'
dataset = 'stdlib'
n_layer = 4
n_head = 4
n_embd = 256
block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 5000
# AdamW and cosine, as tuned here: bench/bench_recipe.py chose Muon and wsd for the 4x4x128 default, and
# has not yet been run at this size (two seeds at equal time: about two hours of a 2-core CPU)
optimizer = 'adamw'
lr_schedule = 'cosine'
eval_interval = 500
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
ckpt_interval = 50
rolling_interval = 500
