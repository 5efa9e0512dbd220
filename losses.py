"""The Inversion-DPO loss family and its baselines. Pure tensor code.

Every loss takes per-sample squared errors (mean over latent elements) that the trainer computed, and returns a
`LossOutput`: the loss (mean over pairs) and detached metrics. Notation (method spec, section 2):

    D_i = mean (eps~_theta(x_{i-1}, tau_i) - e_i)^2            paper / official forms
    E_i(m) = mean (eps~_m(x_i, tau_i) - e_i)^2, m in {theta, ref}  exact form
    E_i(m) = mean (eps~_m(x_i, tau_i) - eps^_i)^2                   anchored form (eps^_i: inversion.anchored_noise)
    S = (1/N) sum_i w_i * (policy error_i - reference error_i)      (reference error is 0 in the paper forms)
    loss = -log sigmoid(margin),  margin = -beta/2 * (S_w - S_l)   (official form: +beta/2)

A pair whose margin is positive is "implicitly correct": the policy fits the winner better than the loser,
relative to the reference.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHTINGS = ("official", "uniform")
LOSS_TYPES = ("inversion_dpo", "inversion_dpo_official", "inversion_dpo_exact", "inversion_dpo_x0", "diffusion_dpo",
              "sft")
LOSS_STEP_SAMPLINGS = ("uniform", "weighted", "stratified")  # how --loss_timesteps draws its steps
SATURATION_MARGIN = 5.0  # |margin| above this: sigmoid within 0.7% of 0 or 1, the pair's gradient nearly gone


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    metrics: dict  # name -> detached scalar tensor


def check_choice(kind, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(allowed)}")


def timestep_weights(alphas, weighting):
    """w_i for steps with noise levels `alphas` = a(tau_i): "official" 1 / (2 a(tau_i)), "uniform" 1.

    (The released code writes the official weight as (1 - a) / (2 (1 - a) a), the same number.)
    """
    check_choice("timestep weighting", weighting, WEIGHTINGS)
    alphas = torch.as_tensor(alphas, dtype=torch.float32)
    if weighting == "uniform":
        return torch.ones_like(alphas)
    return 1.0 / (2.0 * alphas)


def flow_timestep_weights(sigmas, weighting):
    """w_i for velocity errors at flow noise levels `sigmas` (METHOD.md section 7): "official" gives each step the
    epsilon-space weight 1 / (2a) that the DDPM official weight gives at the same signal-to-noise ratio
    (a = SNR / (1 + SNR), SNR = (1 - sigma)^2 / sigma^2) times the factor (1 - sigma)^2 that turns a velocity error
    into an epsilon error: ((1 - sigma)^2 + sigma^2) / 2. "uniform": 1."""
    check_choice("timestep weighting", weighting, WEIGHTINGS)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if weighting == "uniform":
        return torch.ones_like(sigmas)
    return ((1 - sigmas) ** 2 + sigmas**2) / 2


def draw_loss_steps(weights, count, sampling, generator=None):
    """Draw `count` (M) of the N steps at which to evaluate S, and the weight each gets in the estimate
    (METHOD.md section 8): with steps i_1..i_M drawn with probabilities p_i,

        S^ = (1/M) sum_m w_{i_m} d_{i_m} / (N p_{i_m})        unbiased for S = (1/N) sum_i w_i d_i.

    uniform: M distinct steps, every subset equally likely (S^ = (1/M) sum w_i d_i).
    weighted: M independent draws with p_i = w_i / W (W = sum_j w_j): S^ = (W / N) (1/M) sum_m d_{i_m}.
    stratified: the N steps split into M consecutive blocks (sizes differing by at most 1), one step from each
        block b with probability w_i / W_b inside it: S^ = sum_b (W_b / N) d_{i_b}.

    Returns (steps (K,) int64 ascending and distinct, estimate_weights (K,) float32) such that
    `trajectory_score(errors[:, steps], ..., estimate_weights)` = (1/K) sum_k estimate_weights_k d_k is S^
    (a step drawn twice by "weighted" is evaluated once, with twice the weight). count >= N with uniform or
    stratified draws gives every step with its own weight: S exactly.
    """
    check_choice("loss timestep sampling", sampling, LOSS_STEP_SAMPLINGS)
    weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
    num_steps = len(weights)
    if count < 1:
        raise ValueError(f"draw at least one loss step, got {count}")
    if bool((weights <= 0).any()):
        raise ValueError("every step weight must be positive to be drawn")
    if sampling != "weighted" and count >= num_steps:
        return torch.arange(num_steps), weights.clone()
    if sampling == "uniform":
        steps = torch.randperm(num_steps, generator=generator)[:count].sort().values
        return steps, weights[steps]
    if sampling == "weighted":
        drawn = torch.multinomial(weights, count, replacement=True, generator=generator)
        steps, times = drawn.unique(return_counts=True)
        # coefficient of step i in S^: times_i * W / (N M); K times that is its estimate weight
        return steps, times.float() * weights.sum() / (num_steps * count) * len(steps)
    blocks = torch.arange(num_steps).tensor_split(count)
    picks = [block[torch.multinomial(weights[block], 1, generator=generator)] for block in blocks]
    steps = torch.cat(picks)
    totals = torch.stack([weights[block].sum() for block in blocks])
    return steps, totals / num_steps * count


def reference_scale(reference_errors, weights):
    """R = mean over images of (1/N) sum_i w_i E_i(ref): the weighted error the reference itself makes on the
    trajectories, the natural unit of a score S. (rows, N) errors, (N,) weights -> scalar."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=reference_errors.device)
    return (reference_errors.float() * weights).mean()


def relative_beta(kappa, scale):
    """beta = kappa / R: the DPO temperature that makes a margin of kappa/2 mean "the policy fits the winner better
    than the loser by one reference error R". A kappa carries over between models, resolutions, schedules, step
    weightings and forms, where a beta in absolute units does not (the anchored form's default rule)."""
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"the reference's error scale must be positive and finite to set beta from it, got {scale}; "
                         "give --beta_dpo explicitly")
    return kappa / scale


def squared_error(prediction, target, batch_dims=1):
    """Mean of (prediction - target)^2 over every axis after the first `batch_dims`, in float32."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must match")
    return (prediction.float() - target.float()).pow(2).flatten(batch_dims).mean(-1)


def _as_pairs(name, errors, reference):
    """Check a (B, N) error matrix against `reference`'s shape; no silent broadcasting."""
    if errors.ndim != 2 or errors.shape != reference.shape:
        raise ValueError(
            f"{name} has shape {tuple(errors.shape)}; expected (pairs, steps) = {tuple(reference.shape)}"
        )
    return errors.float()


def trajectory_score(policy_errors, reference_errors, weights):
    """S = (1/N) sum_i w_i * (policy_errors_i - reference_errors_i), per row: (B, N) errors, (N,) weights -> (B,)."""
    weights = torch.as_tensor(weights, dtype=torch.float32, device=policy_errors.device)
    if weights.shape != policy_errors.shape[-1:]:
        raise ValueError(f"{tuple(weights.shape)} weights for {policy_errors.shape[-1]} steps; give one per step")
    return ((policy_errors - reference_errors) * weights).mean(-1)


def preference_loss(policy_w, reference_w, policy_l, reference_l, weights, beta, sign=-1.0):
    """-log sigmoid(sign * beta/2 * (S_w - S_l)) averaged over pairs, with S from `trajectory_score`.

    All error inputs are (B, N); sign -1 is the DPO direction (fit the winner, diverge from the loser).
    """
    policy_w = _as_pairs("policy winner errors", policy_w, policy_w)
    for name, errors in (("reference winner errors", reference_w), ("policy loser errors", policy_l),
                         ("reference loser errors", reference_l)):
        _as_pairs(name, errors, policy_w)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    score_w = trajectory_score(policy_w, reference_w.float(), weights)
    score_l = trajectory_score(policy_l.float(), reference_l.float(), weights)
    margin = sign * beta / 2 * (score_w - score_l)
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": loss.detach(),
        "margin": margin.detach().mean(),
        "implicit_accuracy": (margin.detach() > 0).float().mean(),
        "saturated": (margin.detach().abs() > SATURATION_MARGIN).float().mean(),
        "score_w": score_w.detach().mean(),
        "score_l": score_l.detach().mean(),
    }
    return LossOutput(loss, metrics)


def inversion_dpo(policy_w, policy_l, weights, beta):
    """Paper form. policy_* are D_i, (B, N): the trained model at x_{i-1} against the stored e_i.

    The reference's own error there is exactly 0 (e_i is its prediction), so S = (1/N) sum w_i D_i and
    loss = -log sigmoid(-beta/2 (S_w - S_l)). Its gradient is exactly 0 while theta equals the reference.
    """
    return preference_loss(policy_w, torch.zeros_like(policy_w), policy_l, torch.zeros_like(policy_l), weights, beta)


def inversion_dpo_official(policy_w, policy_l, weights, beta):
    """The released code's form: as `inversion_dpo` but minimising -log sigmoid(+beta/2 (S_w - S_l)).

    The opposite sign to the paper's figure: it fits the loser and diverges from the winner. Kept only to
    reproduce the released run.
    """
    zeros_w, zeros_l = torch.zeros_like(policy_w), torch.zeros_like(policy_l)
    return preference_loss(policy_w, zeros_w, policy_l, zeros_l, weights, beta, sign=1.0)


def inversion_dpo_exact(policy_w, reference_w, policy_l, reference_l, weights, beta):
    """Trajectory-consistent form: Diffusion-DPO with the random noising replaced by the inversion path.

    E_i(m) = mean (eps~_m(x_i, tau_i) - e_i)^2 for m = policy (policy_*) and reference (reference_*), (B, N) each;
    S = (1/N) sum w_i (E_i(theta) - E_i(ref)); loss = -log sigmoid(-beta/2 (S_w - S_l)). Loss log 2 and a
    non-zero gradient at theta = ref.
    """
    return preference_loss(policy_w, reference_w, policy_l, reference_l, weights, beta)


def inversion_dpo_x0(policy_w, reference_w, policy_l, reference_l, weights, beta):
    """Anchored form: Diffusion-DPO's denoising error taken at the points of the reference's inversion path.

    E_i(m) = mean (eps~_m(x_i, tau_i) - eps^_i)^2 for m = policy (policy_*) and reference (reference_*), (B, N) each,
    where eps^_i = (x_i - sqrt(a_i) x_0) / sqrt(1 - a_i) is x_i's noise relative to the clean latent;
    S = (1/N) sum w_i (E_i(theta) - E_i(ref)); loss = -log sigmoid(-beta/2 (S_w - S_l)). Loss log 2 and a non-zero
    gradient at theta = ref. One random step per pair with uniform weights is InPO's loss on this inversion.
    """
    return preference_loss(policy_w, reference_w, policy_l, reference_l, weights, beta)


def diffusion_dpo(policy_w, reference_w, policy_l, reference_l, beta):
    """Diffusion-DPO (Wallace et al. 2023). Errors are (B,): ||eps - eps_m(x_t)||^2 at one random t per pair, the
    same eps and t for winner and loser; loss = -log sigmoid(-beta/2 ((p_w - r_w) - (p_l - r_l)))."""
    errors = (policy_w, reference_w, policy_l, reference_l)
    if any(e.ndim != 1 for e in errors):
        raise ValueError(f"diffusion_dpo takes one error per pair, (B,); got shapes {[tuple(e.shape) for e in errors]}")
    return preference_loss(*(e.unsqueeze(1) for e in errors), weights=torch.ones(1), beta=beta)


def sft(policy_w):
    """Supervised fine-tuning on winners: the mean denoising error, (B,) -> scalar."""
    loss = policy_w.float().mean()
    return LossOutput(loss, {"loss": loss.detach()})
