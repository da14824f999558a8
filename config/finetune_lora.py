# Fine-tune a trained model on a second corpus with LoRA adapters, e.g. the default model (out/,
# from `python prepare.py && python train.py`) on your own notes:
#   python prepare.py --input=notes/ --dataset=notes --tokenizer=data/stdlib/tokenizer.json --extend_vocab=1024
#   python train.py config/finetune_lora.py --init_from=out/best.safetensors --dataset=notes
#   python sample.py --out_dir=out-lora --start="..."
# The base stays frozen: only the adapters and the new tokens' embedding rows train, and each
# checkpoint holds just those (plus their AdamW state) and a reference to out-lora/base.safetensors,
# a hard link of the file it started from. Run the same command again to continue after a stop.
out_dir = 'out-lora'
reset_state = True  # a new run from the base's weights: its own iterations, optimizer and data order
lora_rank = 8  # rank of the update B @ A added to each target weight
lora_alpha = 16.0  # the update is scaled by alpha / rank = 2
lora_dropout = 0.05  # on the adapters' input
lora_targets = 'attn.c_attn,attn.c_proj'  # the attention's projections; add mlp.c_fc,mlp.c_proj for more capacity
trainable = 'new_tokens'  # the rows --extend_vocab added (the old rows stay bit-identical); '' without an extension
# AdamW with cosine, as tuned for LoRA: the adapters train on AdamW whatever `optimizer` says
# (optim.configure_optimizers); Muon would take only the base's matrices, with trainable=all
optimizer = 'adamw'
lr_schedule = 'cosine'
batch_size = 16
learning_rate = 1e-3  # adapters start at zero and take larger steps than a full fine-tune
min_lr = 1e-4
warmup_iters = 50
max_iters = 1000
eval_interval = 100
ckpt_interval = 100
rolling_interval = 500
