"""What one optimiser step costs per pair, in passes of each model over one image (METHOD.md section 8), and what a
trajectory cache's fill costs and when it has paid for itself against Diffusion-DPO.

`passes_per_pair` is the bill as a formula; tests/test_step_cost.py runs the trainer's own step on tiny models with
every model's calls counted and checks them against it, so the table below is what the code does.

    python benchmarks/step_cost.py            # docs/speed_and_memory.md's table (SDXL recipe and the toy settings), markdown

Counting: a policy pass with gradient is a forward and a backward (about 3 forward passes of compute); "policy,
no grad" is the extra forward of the chunked gradient (--trajectory_chunk_size K below the evaluated steps: pass 1
takes every error without gradient, pass 2 recomputes with it); a pass with classifier-free guidance is two (FLUX
takes guidance as an input: one). Text: captions through each text encoder.
"""

import argparse

NOISING_FORMS = ("diffusion_dpo", "sft")
AT_END_FORMS = ("inversion_dpo_exact", "inversion_dpo_x0")


def passes_per_pair(loss_type, num_steps=80, guidance=2.0, loss_guidance=None, loss_timesteps=None, chunk_size=1,
                    cached=False, flux=False):
    """{"policy": passes with gradient, "policy_no_grad": extra forwards, "reference": forwards, "vae": encodes,
    "text": captions} per pair and optimiser step. `cached`: every entry the step needs is in the trajectory cache.
    `loss_timesteps`: M evaluated steps (the weighted draw evaluates at most M: a step drawn twice runs once)."""
    loss_guidance = guidance if loss_guidance is None else loss_guidance
    per_point = 1 if flux or loss_guidance == 1 else 2  # passes per trajectory point in the loss
    per_inversion_point = 1 if flux or guidance == 1 else 2
    encode = {"vae": 0 if cached else 2, "text": 0 if cached else 1}
    if loss_type in NOISING_FORMS:
        images = 1 if loss_type == "sft" else 2
        return {"policy": images, "policy_no_grad": 0, "reference": images if loss_type == "diffusion_dpo" else 0,
                **encode}
    evaluated = num_steps if loss_timesteps is None else min(loss_timesteps, num_steps)
    policy = 2 * evaluated * per_point
    reference = 0
    if not cached:
        reference = 2 * num_steps * per_inversion_point + (2 * num_steps * per_point if loss_type in AT_END_FORMS else 0)
    return {"policy": policy, "policy_no_grad": policy if chunk_size < evaluated else 0, "reference": reference,
            **encode}


def fill_passes_per_pair(loss_type, num_steps=80, guidance=2.0, loss_guidance=None, flux=False):
    """Reference forwards (and encodes) that filling the cache costs per pair: the uncached step without the policy."""
    uncached = passes_per_pair(loss_type, num_steps, guidance, loss_guidance, cached=False, flux=flux)
    return {"reference": uncached["reference"], "vae": uncached["vae"], "text": uncached["text"]}


def forward_equivalents(passes):
    """Model compute of one step in forward passes of the denoiser (backward ~ 2 forwards; encoders left out)."""
    return 3 * passes["policy"] + passes["policy_no_grad"] + passes["reference"]


def break_even_epochs(fill, per_epoch, opponent_per_epoch):
    """Epochs (or runs of a sweep sharing the cache, in epochs) after which fill + E x per_epoch <= E x opponent:
    E = fill / (opponent - per_epoch); None when a warm epoch costs no less than the opponent's."""
    saving = opponent_per_epoch - per_epoch
    return fill / saving if saving > 0 else None


SETTINGS = [  # (label, loss_type, N, guidance, loss guidance, M, K)
    ("diffusion_dpo", "diffusion_dpo", None, None, None, None, None),
    ("inversion_dpo (paper form), N 80, g 2, K 1", "inversion_dpo", 80, 2.0, 2.0, None, 1),
    ("inversion_dpo_x0, N 80, g 2, K 1 (the sdxl.sh recipe)", "inversion_dpo_x0", 80, 2.0, 2.0, None, 1),
    ("inversion_dpo_x0, N 80, g 2, K 80 (one graph)", "inversion_dpo_x0", 80, 2.0, 2.0, None, 80),
    ("inversion_dpo_x0, N 80, g 2, loss g 1", "inversion_dpo_x0", 80, 2.0, 1.0, None, 80),
    ("inversion_dpo_x0, N 80, g 2, loss g 1, M 4", "inversion_dpo_x0", 80, 2.0, 1.0, 4, 4),
    ("inversion_dpo_x0, N 80, g 2, loss g 1, M 1", "inversion_dpo_x0", 80, 2.0, 1.0, 1, 1),
    ("inversion_dpo_x0, N 10, g 1, M 10 (the toy studies)", "inversion_dpo_x0", 10, 1.0, 1.0, None, 10),
    ("inversion_dpo_x0, N 10, g 1, M 2", "inversion_dpo_x0", 10, 1.0, 1.0, 2, 2),
    ("inversion_dpo_x0, N 10, g 1, M 1", "inversion_dpo_x0", 10, 1.0, 1.0, 1, 1),
]


def table():
    opponent = forward_equivalents(passes_per_pair("diffusion_dpo", cached=True))
    lines = ["| setting | policy fwd+bwd | policy fwd, no grad | reference fwd (uncached) | VAE / text (uncached) | "
             "compute, warm (fwd-equivalents) | fill (reference fwd) | break-even vs diffusion_dpo, warm |",
             "|---|---|---|---|---|---|---|---|"]
    for label, loss_type, n, g, loss_g, m, k in SETTINGS:
        kwargs = {} if n is None else dict(num_steps=n, guidance=g, loss_guidance=loss_g, loss_timesteps=m,
                                           chunk_size=k)
        cold, warm = passes_per_pair(loss_type, **kwargs), passes_per_pair(loss_type, cached=True, **kwargs)
        compute = forward_equivalents(warm)
        if loss_type == "diffusion_dpo":
            fill, even = "0 (encodings only)", "-"
        else:
            fill = fill_passes_per_pair(loss_type, n, g, loss_g)["reference"]
            epochs = break_even_epochs(fill, compute, opponent)
            even = "never (a warm step costs more)" if epochs is None else f"{epochs:.0f} epochs"
        lines.append(f"| {label} | {warm['policy']} | {warm['policy_no_grad']} | {cold['reference']} | "
                     f"{cold['vae']} / {cold['text']} | {compute} | {fill} | {even} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print("\n".join(table()))


if __name__ == "__main__":
    main()
