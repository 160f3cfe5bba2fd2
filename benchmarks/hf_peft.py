"""Worker: Hugging Face PEFT LoRA on a transformers GPT-2 of the same shape.

A plain PyTorch training step (forward, cross-entropy on the same 128
next-token targets as the Keras runs, backward, AdamW) on a
`GPT2LMHeadModel` with random weights and no dropout. GPT-2 in transformers
computes q, k and v with one fused `Conv1D` (`c_attn`, d → 3d). LoRA of
rank r on `c_attn` has r·(d + 3d) parameters per block, the same count as
rank-r LoRA on separate query and value projections, r·(d + d)·2; the
update also reaches the keys.
"""

import time

import measure
import workloads


def build(workload):
    import peft
    import torch
    import transformers

    shape = workloads.GPT2_SIZES[workload]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=shape["vocabulary_size"],
        n_positions=workloads.MAX_SEQUENCE_LENGTH,
        n_embd=shape["hidden_dim"],
        n_layer=shape["num_layers"],
        n_head=shape["num_heads"],
        n_inner=shape["intermediate_dim"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(
        r=8,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["c_attn"],
        fan_in_fan_out=True,  # Conv1D stores its weight as (in, out).
        bias="none",
    )
    return peft.get_peft_model(model, lora)


def run(config):
    import peft
    import torch
    import transformers

    workload = config["workload"]
    batch_size = config["batch_size"]
    result = {
        "batch_size": batch_size,
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    model = build(workload)
    model.train()
    result["attention_implementation"] = model.base_model.model.config._attn_implementation
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_parameters"] = int(sum(p.numel() for p in trainable))
    result["total_parameters"] = int(sum(p.numel() for p in model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    x, y = workloads.gpt2_training_batch(workload, batch_size)
    input_ids = torch.from_numpy(x["token_ids"]).long()
    attention_mask = torch.from_numpy(x["padding_mask"]).long()
    targets = torch.from_numpy(y).long()
    result["build_seconds"] = time.perf_counter() - start
    result["rss_before_training_mb"] = measure.current_rss_mb()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss)

    for _ in range(config["fit_steps"] + config["warmup_steps"]):
        step()
    result["step_seconds"], result["step_cpu_seconds"] = measure.time_calls(step, config["steps"])
    result["peak_rss_mb"] = measure.peak_rss_mb()
    result["backend"] = "torch"
    result["jit_compile"] = False
    return result
