"""MesaNet (von Oswald et al.): the output of a fixed number of conjugate-gradient steps against the
exact solve of (H_t + diag(lamb)) x_t = q_t, as the regularizer lamb (the conditioning) varies.

Inputs are random: unit keys and queries, beta ~ U(0, 1), decay exp(g) ~ 0.98 (a memory of ~50
tokens, so H_t's largest eigenvalues reach ~ sum beta ~ 25 while its smallest stay near 0). CG's
textbook bound 2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^n, with kappa the condition number of the
final system, is reported beside the measured error.
"""
import torch
import torch.nn.functional as F

from llm.ops.mesa import chunk_mesa, recurrent_mesa
from llm.reproduce import mean_std, save

DESCRIPTION = "MesaNet: output error of n CG steps vs the exact solve, by lamb (conditioning)"
PAPER = {"claim": "a fixed, small number of CG steps approximates the exact mesa solve; the error falls "
                  "geometrically with the steps at a rate set by the condition number (lamb keeps it bounded)",
         "cg_steps_in_training": 30}  # fla's and our default, not a measured number


def _inputs(seed: int, T: int, K: int, lamb_min: float):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, H = 2, 2
    return dict(q=F.normalize(rand(B, T, H, K), dim=-1), k=F.normalize(rand(B, T, H, K), dim=-1),
                v=rand(B, T, H, K), g=F.logsigmoid(rand(B, T, H) * 0.5 + 4.0),
                beta=torch.rand(B, T, H, generator=gen, dtype=torch.float64),
                lamb=torch.full((H, K), lamb_min, dtype=torch.float64))


def _condition_number(x) -> float:
    """kappa of the last position's system H_T + diag(lamb), the worst over batch and heads."""
    _, (h, _) = recurrent_mesa(**x, cg_steps=None, output_final_state=True)
    eig = torch.linalg.eigvalsh(h + torch.diag_embed(x["lamb"]))
    return (eig[..., -1] / eig[..., 0]).max().item()


def run(out_dir: str, quick: bool, seeds: int) -> dict:
    T, K = (64, 16) if quick else (512, 64)
    steps = [1, 2, 4, 8, 16, 32] + ([] if quick else [64])
    lambdas = [0.05, 0.25, 1.0]
    rows = []
    for lamb_min in lambdas:
        errors = {n: [] for n in steps}
        kappas = []
        for seed in range(seeds):
            x = _inputs(seed, T, K, lamb_min)
            exact, _ = recurrent_mesa(**x, cg_steps=None)
            kappas.append(_condition_number(x))
            for n in steps:
                o, _ = chunk_mesa(**x, cg_steps=n)
                errors[n].append(((o - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item())
        kappa = max(kappas)
        rate = (kappa ** 0.5 - 1) / (kappa ** 0.5 + 1)
        rows.append({"lamb": lamb_min, "kappa_max": kappa,
                     "rel_error": {str(n): mean_std(errors[n]) for n in steps},
                     "cg_bound": {str(n): 2 * rate ** n for n in steps}})
    results = {"description": DESCRIPTION, "paper": PAPER, "quick": quick, "seeds": seeds,
               "T": T, "K": K, "cg_steps": steps, "rows": rows}
    return save(out_dir, "mesa_cg", results, _plot)


def _plot(fig, results):
    ax = fig.add_subplot()
    for row in results["rows"]:
        n = results["cg_steps"]
        mean = [row["rel_error"][str(s)]["mean"] for s in n]
        line, = ax.semilogy(n, [max(m, 1e-16) for m in mean], "o-", label=f"lamb={row['lamb']:g}")
        ax.semilogy(n, [row["cg_bound"][str(s)] for s in n], "--", color=line.get_color(), alpha=0.5)
    ax.set_xlabel("CG steps")
    ax.set_ylabel("mean relative output error vs exact solve")
    ax.set_title(f"Mesa CG (T={results['T']}, K={results['K']}); dashed: CG bound")
    ax.set_ylim(1e-12, 10)
    ax.legend()
