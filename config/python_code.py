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
eval_interval = 500
# the optimizer and schedule are train.py's (Muon, lr 8e-3, wsd): bench/bench_recipe.py chose them at
# 4x4x128; at this size a 400-iteration probe (one seed, equal iterations, Muon's 4% slower) ended at
# val loss 2.89 against 3.72 for the AdamW recipe this file had (lr 1e-3 cosine to 1e-4; docs/training.md)
ckpt_interval = 50
rolling_interval = 500
