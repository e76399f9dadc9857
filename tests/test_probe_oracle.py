"""An independent oracle for every row and curve the probe emits.

The oracle never calls rwasym to get an activation, a weight or a ΔW. It knows each architecture
only by its own module names (`LAYOUTS`): it plants ΔW into the Hugging Face module (GPT-2's fused,
transposed ``c_attn``; NeoX's per-head-interleaved ``query_key_value``) and saves the tuned
checkpoint, reads ΔW back from the two Hugging Face models, takes activations with torch forward
hooks on a plain ``transformers`` model, and writes each formula out:

    f = ‖ΔW U‖²_F / ‖ΔW‖²_F (input side) or ‖Uᵀ ΔW‖²_F / ‖ΔW‖²_F (output side),  r = f·n/k,
    U = top-k eigenvectors of the centered covariance (activation) or top-k left singular vectors
    of diag(γ_final)·W_U (prediction); k_variance = least k with explained ratio ≥ 0.9;
    Haar null: E f = k/n, Var f = 2k(n−k)/(n(n−1)(n+2)) · (tr S² − (tr S)²/n) with S = ΔWᵀΔW/‖ΔW‖²
    (input side; ΔWΔWᵀ output side); the percentile from its own QR-drawn Haar subspaces.

Sites: Q/K/V read the attention input; W_in/W_gate the MLP input; W_O writes into resid_mid in a
sequential block and into resid_post in a parallel one (NeoX), W_out into resid_post; the inner side
of W_O is the heads' z, of W_out the MLP hidden. Per-head rows slice rows (Q/K/V, GQA-aware) or
columns (O); an O head's inner basis is the PCA of its block of the z covariance.

Every row and every curve of each probe result is compared with the oracle's (the key sets must be
equal), on the native model, GPT-2, Llama with GQA, Llama with one KV head, NeoX and the real
SmolLM2-135M (its first two blocks; the tuned model loaded and streamed).
"""

import shutil

import pytest
import torch

import rwasym

OC = "_original_component"  # where a TransformerBridge keeps the wrapped torch module

# Module names relative to one decoder layer; "qkv" is a fused projection with its row layout:
# "blocks" = [Q | K | V] (GPT-2's Conv1D), "heads" = per head [q_h, k_h, v_h] (GPT-NeoX).
LAYOUTS = {
    "native": dict(
        layers="layers",
        layer=OC,
        q=f"attn.{OC}.q.{OC}",
        k=f"attn.{OC}.k.{OC}",
        v=f"attn.{OC}.v.{OC}",
        o=f"attn.{OC}.o.{OC}",
        w_in=f"mlp.{OC}.fc_in.{OC}",
        w_out=f"mlp.{OC}.fc_out.{OC}",
        ln_mlp="ln2",
        final=f"ln_out.{OC}",
        unembed=f"head.{OC}",
        parallel=False,
    ),
    "gpt2": dict(
        layers="transformer.h",
        qkv="attn.c_attn",
        qkv_rows="blocks",
        o="attn.c_proj",
        w_in="mlp.c_fc",
        w_out="mlp.c_proj",
        ln_mlp="ln_2",
        final="transformer.ln_f",
        unembed="lm_head",
        parallel=False,
    ),
    "llama": dict(
        layers="model.layers",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        w_in="mlp.up_proj",
        w_gate="mlp.gate_proj",
        w_out="mlp.down_proj",
        ln_mlp="post_attention_layernorm",
        final="model.norm",
        unembed="lm_head",
        parallel=False,
    ),
    "neox": dict(
        layers="gpt_neox.layers",
        qkv="attention.query_key_value",
        qkv_rows="heads",
        o="attention.dense",
        w_in="mlp.dense_h_to_4h",
        w_out="mlp.dense_4h_to_h",
        final="gpt_neox.final_layer_norm",
        unembed="lm_head",
        parallel=True,
    ),
}
KINDS = {"W_Q": "q", "W_K": "k", "W_V": "v", "W_O": "o", "W_in": "w_in", "W_gate": "w_gate", "W_out": "w_out"}
READ = ("W_Q", "W_K", "W_V", "W_in", "W_gate")


def _get(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _linear(module):
    """The weight in nn.Linear layout (n_out, n_in), as a view; GPT-2's Conv1D stores its transpose."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


class Arch:
    """One model seen through its own module names: weights per rwasym matrix name, planting, hooks."""

    def __init__(self, root, layout, n_heads, n_kv, d_head):
        self.root, self.lay, self.n_heads, self.n_kv, self.d_head = root, layout, n_heads, n_kv, d_head
        self.n_layers = len(_get(root, layout["layers"]))

    def layer(self, L):
        block = _get(self.root, self.lay["layers"])[L]
        return _get(block, self.lay["layer"]) if "layer" in self.lay else block

    def kinds(self):
        return [k for k in KINDS if KINDS[k] in self.lay or (k in ("W_Q", "W_K", "W_V") and "qkv" in self.lay)]

    def _view(self, L, kind):
        """A view of the weight in nn.Linear layout (n_out, n_in); Q/K/V of a fused projection as
        (heads, d_head, n_in), rows head-major (head h = rows h·d_head:(h+1)·d_head)."""
        block = self.layer(L)
        if kind in ("W_Q", "W_K", "W_V") and "qkv" in self.lay:
            j = "QKV".index(kind[-1])
            W = _linear(_get(block, self.lay["qkv"]))
            if self.lay["qkv_rows"] == "blocks":
                n = W.shape[0] // 3
                return W[j * n : (j + 1) * n].view(-1, self.d_head, W.shape[1])
            return W.view(self.n_heads, 3, self.d_head, -1)[:, j]
        return _linear(_get(block, self.lay[KINDS[kind]]))

    def weight(self, L, kind):
        """W (n_out, n_in) float64."""
        W = self._view(L, kind).detach().double()
        return W.reshape(-1, W.shape[-1]).clone()

    @torch.no_grad()
    def plant(self, L, kind, D):
        W = self._view(L, kind)
        W += D.to(W.dtype).view(W.shape)

    def activations(self, forward, tokens):
        """site -> (tokens, width) float64 for every layer: attn_in, mlp_in, z, hidden, resid_mid, resid_post."""
        seen, hooks = {}, []

        def pre(key):
            def hook(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                seen[key] = x.detach().reshape(-1, x.shape[-1]).double()

            return hook

        def post(key):
            def hook(module, args, output):
                x = output[0] if isinstance(output, tuple) else output
                seen[key] = x.detach().reshape(-1, x.shape[-1]).double()

            return hook

        for L in range(self.n_layers):
            block = self.layer(L)
            attn_first = self.lay["qkv"] if "qkv" in self.lay else self.lay["q"]
            for key, path in (
                (f"{L}.attn_in", attn_first),
                (f"{L}.mlp_in", self.lay["w_in"]),
                (f"{L}.z", self.lay["o"]),
                (f"{L}.hidden", self.lay["w_out"]),
            ):
                hooks.append(_get(block, path).register_forward_pre_hook(pre(key), with_kwargs=True))
            if not self.lay["parallel"]:
                mid = _get(block, self.lay["ln_mlp"])
                hooks.append(mid.register_forward_pre_hook(pre(f"{L}.resid_mid"), with_kwargs=True))
            hooks.append(_get(self.root, self.lay["layers"])[L].register_forward_hook(post(f"{L}.resid_post")))
        try:
            with torch.no_grad():
                forward(tokens)
        finally:
            for h in hooks:
                h.remove()
        last = seen[f"{self.n_layers - 1}.resid_post"]
        with torch.no_grad():  # the unembedding's input: the HF final norm module applied to the last residual
            norm = _get(self.root, self.lay["final"])
            seen["final_norm_out"] = norm(last.to(next(norm.parameters()).dtype)).double()
        return seen

    def prediction_basis(self):
        """Left singular vectors of diag(γ_final)·W_U (d_model × d_model) and their shares σ²/Σσ²."""
        w_u = _get(self.root, self.lay["unembed"]).weight.detach().double().T  # (d_model, vocab)
        gamma = _get(self.root, self.lay["final"]).weight.detach().double()
        r = torch.linalg.qr((gamma[:, None] * w_u).T).R  # M = Rᵀ Qᵀ: M's left singular vectors are Rᵀ's
        U, S, _ = torch.linalg.svd(r.T)
        return U, S.square() / S.square().sum()


def _pca(x, eps=None):
    """Eigenvectors (descending) of the centered covariance C of rows x, the explained-variance
    ratios, and the Davis–Kahan bound on f(j) for each j: with tr S = 1, |f(j) − f'(j)| ≤
    ‖sin Θ_j‖ ≤ ‖E‖₂ / (λ_j − λ_{j+1} − ‖E‖₂) for an error E in C. ‖E‖₂ = eps·‖C‖₂ (eps: the
    relative disagreement of the two forward passes' activations), or for eps=None the float32
    rounding of the centred Gram product (what `RunningCovariance` forms per batch), measured here."""
    c = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(c)
    order = evals.argsort(descending=True)
    evals, evecs = evals[order], evecs[:, order]
    xc = x - x.mean(0)
    err = (
        eps * float(evals[0])
        if eps is not None
        else float(torch.linalg.matrix_norm((xc.float().T @ xc.float()).double() - xc.T @ xc, ord=2)) / (len(x) - 1)
    )
    gaps = torch.cat([evals[:-1] - evals[1:], torch.tensor([float("inf")], dtype=torch.float64)])
    bound = (err / (gaps - err)).where(gaps > err, torch.tensor(float("inf"), dtype=torch.float64))
    ev = evals.clamp_min(0)
    return evecs, ev / ev.sum(), bound


_HAAR: dict = {}


def _haar_diagonals(n, k, draws=1000):
    """(draws, n) diagonals of P = QQᵀ for Haar-random k-frames Q of R^n (QR of Gaussians), seeded."""
    if (n, k) not in _HAAR:
        g = torch.Generator().manual_seed(1000 + n + k)
        q = torch.linalg.qr(torch.randn(draws, n, k, generator=g, dtype=torch.float64)).Q
        _HAAR[(n, k)] = q.square().sum(-1)
    return _HAAR[(n, k)]


def _null_law(d, side):
    """(n, s₂ = tr S², eigenvalues of S) for S = ΔWᵀΔW/‖ΔW‖² (input side) or ΔWΔWᵀ/‖ΔW‖² (output)."""
    S = d.T @ d if side == "input" else d @ d.T
    S = S / torch.trace(S)
    return S.shape[0], float(torch.trace(S @ S)), torch.linalg.eigvalsh(S)


def _null_std(law, k):
    """Exact std of f over Haar-random k-dim subspaces: Var f = 2k(n−k)/(n(n−1)(n+2))·(tr S² − (tr S)²/n)."""
    n, s2, _ = law
    return max(2 * k * (n - k) / (n * (n - 1) * (n + 2)) * (s2 - 1 / n), 0.0) ** 0.5


def _null_samples(law, k):
    """f = Σ_i w_i P_ii over the oracle's Haar draws, w the eigenvalues of S (Haar invariance)."""
    n, _, w = law
    return _haar_diagonals(n, k) @ w


def _fractions(d, U, side):
    """f(j) for j = 1..m: cumulative ‖ΔW U[:, :j]‖² / ‖ΔW‖² (input side) or ‖U[:, :j]ᵀ ΔW‖² (output)."""
    e = (d @ U).square().sum(0) if side == "input" else (U.T @ d).square().sum(1)
    return e.cumsum(0) / d.square().sum()


def _rho_std(d, shares, n):
    sigma2 = torch.linalg.svdvals(d).square()
    s2, c2 = float(sigma2.square().sum() / sigma2.sum() ** 2), float(shares.square().sum())
    return (2 * (n * s2 - 1) * (n * c2 - 1) / ((n - 1) * (n + 2))) ** 0.5


def oracle(arch, acts, deltas, k, variance=0.9, eps=None, pred_rel=1e-9, predictions=None, normalized=False):
    """(rows keyed by (matrix, head, stream, subspace), curves keyed by (matrix, stream, subspace)),
    each with its tolerance. eps: the activations' relative error (a float, or site kind -> float;
    None: float32 Gram rounding); pred_rel: the prediction rows' relative tolerance. predictions:
    {subspace name: (U, eigenvalue shares)} of the residual-side output subspaces (default: "prediction").
    normalized: also the write matrices' activation_normalized rows — the PCA of what the next sublayer reads:
    the MLP input of the block for W_O (sequential), else the next block's attention input, after the last
    block the final norm's output."""
    predictions = predictions or {"prediction": arch.prediction_basis()}
    rows, curves, pcas, laws = {}, {}, {}, {}
    for name, D in deltas.items():
        L, kind = int(name.split(".")[1]), name.split(".")[-1]
        read = kind in READ
        if read:
            resid = f"{L}.attn_in" if kind in ("W_Q", "W_K", "W_V") else f"{L}.mlp_in"
            spaces = [("residual", "input", "activation", resid)]
            spaces += [("residual", "input", name, None) for name in predictions]
            heads = {"W_Q": arch.n_heads, "W_K": arch.n_kv, "W_V": arch.n_kv}.get(kind, 0)
        else:
            resid = f"{L}.resid_post" if kind == "W_out" or arch.lay["parallel"] else f"{L}.resid_mid"
            spaces = [("residual", "output", "activation", resid)]
            spaces += [("residual", "output", name, None) for name in predictions]
            if normalized:
                nxt = (
                    f"{L}.mlp_in"
                    if kind == "W_O" and not arch.lay["parallel"]
                    else f"{L + 1}.attn_in"
                    if arch.n_layers > L + 1
                    else "final_norm_out"
                )
                spaces.append(("residual", "output", "activation_normalized", nxt))
            spaces.append(("inner", "input", "activation", f"{L}.z" if kind == "W_O" else f"{L}.hidden"))
            heads = arch.n_heads if kind == "W_O" else 0
        for stream, side, subspace, site in spaces:
            for head in [None] + list(range(heads)):
                sl = slice(0, None) if head is None else slice(head * arch.d_head, (head + 1) * arch.d_head)
                d = D[sl] if read else D[:, sl]  # heads index rows of Q/K/V, columns of O
                if float(d.square().sum()) == 0.0:
                    continue
                if site is None:
                    U, shares = predictions[subspace]
                    ratio, bound = None, None
                else:
                    block = None if stream == "residual" else head  # an O head's block of z
                    if (site, block) not in pcas:
                        x = acts[site] if block is None else acts[site][:, sl]
                        kind_of_site = site.split(".")[-1]
                        pcas[(site, block)] = _pca(
                            x, eps if eps is None or isinstance(eps, float) else eps.get(kind_of_site, 1e-7)
                        )
                    U, ratio, bound = pcas[(site, block)]
                    shares = ratio
                n = d.shape[1] if side == "input" else d.shape[0]
                kk = min(k, n)
                cum = _fractions(d, U, side)
                # the gradient-shaped null Σ_t ξ_t a_tᵀ: E‖ΔW U‖²/E‖ΔW‖² = tr(UᵀMU)/tr M with M = Σ_t a_t a_tᵀ
                # (uncentred, the matrix's own input; an O head's block), k/n on the output side
                if side == "input":
                    x = acts[resid if read else f"{L}.z" if kind == "W_O" else f"{L}.hidden"]
                    x = x if read or head is None else x[:, sl]
                    M = x.T @ x
                    expected = float(torch.trace(U[:, :kk].T @ M @ U[:, :kk]) / torch.trace(M))
                else:
                    expected = kk / n
                # allowed |Δf(j)|: pred_rel·f for the prediction subspace (γ_final is measured by running
                # the norm); DK_SAFETY × the Davis–Kahan bound for an activation subspace
                tol = pred_rel * cum if bound is None else DK_SAFETY * bound[: len(cum)] + 1e-12
                if (name, head, side) not in laws:
                    laws[(name, head, side)] = _null_law(d, side)
                law = laws[(name, head, side)]
                mean, std, samples = kk / n, _null_std(law, kk), _null_samples(law, kk)
                row = dict(
                    layer=L,
                    kind=kind,
                    matrix_side="read" if read else "write",
                    side=side,
                    k=kk,
                    n=n,
                    fraction=float(cum[kk - 1]),
                    relative=float(cum[kk - 1]) * n / kk,
                    null_mean=mean,
                    null_std=std,
                    null_samples=samples,
                    delta_norm=float(d.norm()),
                    post_norm_scaled=False,
                    # ρ_C = n tr(ΔW C ΔWᵀ) / (tr C ‖ΔW‖²) = n Σ_j ℓ_j ε_j in C's eigenbasis (C = this site's
                    # covariance, or W̃_U W̃_Uᵀ); its null spread from Σσ⁴/(Σσ²)² and Σ ℓ_j², written out
                    rho=n * float((shares * torch.diff(cum, prepend=cum.new_zeros(1))).sum()),
                    rho_null_std=_rho_std(d, shares, n),
                    random_delta_fraction=expected,
                    random_delta_relative=expected * n / kk,
                    tol=dict(fraction=float(tol[kk - 1]), relative=float(tol[kk - 1]) * n / kk),
                )
                # tr(P A) for a unit-trace PSD A moves by at most ‖P − P'‖₂: the same bound as f (a relative one for
                # the prediction subspace), plus the uncentred M's own float32 rounding
                t_rd = (pred_rel * expected if bound is None else float(tol[kk - 1])) + 1e-6 * expected
                row["tol"].update(random_delta_fraction=t_rd, random_delta_relative=t_rd * n / kk)
                if ratio is not None:
                    k90 = next(j + 1 for j, c in enumerate(ratio.cumsum(0).tolist()) if c >= variance)
                    row.update(
                        k_variance=k90,
                        fraction_k_variance=float(cum[k90 - 1]),
                        relative_k_variance=float(cum[k90 - 1]) * n / k90,
                    )
                    row["tol"].update(
                        fraction_k_variance=float(tol[k90 - 1]), relative_k_variance=float(tol[k90 - 1]) * n / k90
                    )
                    # ΔW's share along the mean activation direction μ̂ of the same rows (an O head: its block)
                    x = acts[site] if block is None else acts[site][:, sl]
                    mu = x.mean(0) / x.mean(0).norm()
                    mf = float(((d @ mu) if side == "input" else (mu @ d)).square().sum() / d.square().sum())
                    row.update(mean_fraction=mf, mean_relative=mf * n)
                    row["tol"].update(mean_fraction=1e-5 * mf + 1e-12, mean_relative=(1e-5 * mf + 1e-12) * n)
                rows[(name, head, stream, subspace)] = row
                if head is None:
                    ks = sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
                    curves[(name, stream, subspace)] = dict(
                        n=n,
                        ks=ks,
                        fraction=[float(cum[j - 1]) for j in ks],
                        relative=[float(cum[j - 1]) * n / j for j in ks],
                        null_relative_std=[_null_std(law, j) * n / j for j in ks],
                        tol=[float(tol[j - 1]) for j in ks],
                    )
    return rows, curves


def compare(result, expected_rows, expected_curves, null_samples):
    """Every probe row and curve against the oracle's: the same keys, every field."""
    got = {(r["matrix"], r["head"], r["stream"], r["subspace"]): r for r in result.rows}
    assert len(got) == len(result.rows)
    assert set(got) == set(expected_rows), set(got) ^ set(expected_rows)
    for key, want in expected_rows.items():
        row = got[key]
        for field in ("layer", "kind", "matrix_side", "side", "k", "n", "post_norm_scaled", "k_variance"):
            assert row.get(field) == want.get(field), (key, field, row.get(field), want.get(field))
        for field, tol in want["tol"].items():
            assert abs(row[field] - want[field]) <= tol, (key, field, row[field], want[field], tol)
        assert row["null_std"] == pytest.approx(want["null_std"], rel=1e-9), key
        assert row["null_mean"] == pytest.approx(want["null_mean"], rel=1e-12), key
        assert row["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-9), key
        # ρ_C is a trace, well conditioned where single eigenvectors are not: float32 activations give ~1e-6
        assert row["rho"] == pytest.approx(want["rho"], rel=1e-5), (key, row["rho"], want["rho"])
        assert row["rho_null_std"] == pytest.approx(want["rho_null_std"], rel=1e-4), key
        # percentile of f in the Haar null: the probe's draws against the oracle's own
        p = float((want["null_samples"] <= want["fraction"] + 1e-12).double().mean())  # ties within 1e-12 count
        q = min(max(p, 1 / 1000), 1 - 1 / 1000)
        tol = 100 * (6 * (q * (1 - q) * (1 / null_samples + 1 / 1000)) ** 0.5 + 2 / null_samples)
        assert abs(row["null_percentile"] - 100 * p) <= tol, (key, row["null_percentile"], 100 * p)
    got_curves = {(c["matrix"], c["stream"], c["subspace"]): c for c in result.curves}
    assert len(got_curves) == len(result.curves)
    assert set(got_curves) == set(expected_curves)
    for key, want in expected_curves.items():
        curve = got_curves[key]
        assert (curve["n"], curve["ks"]) == (want["n"], want["ks"]), key
        tol = torch.tensor(want["tol"], dtype=torch.float64)
        ks = torch.tensor(want["ks"], dtype=torch.float64)
        for field, t in (("fraction", tol), ("relative", tol * want["n"] / ks)):
            err = (torch.tensor(curve[field]) - torch.tensor(want[field])).abs()
            assert bool((err <= t).all()), (key, field, err.tolist(), t.tolist())
        assert curve["null_relative_std"] == pytest.approx(want["null_relative_std"], rel=1e-9, abs=1e-12), key


def _plants(arch, acts, layers, kinds, generator):
    """ΔW to plant per matrix: rank 2 plus small full-rank noise; W_Q of the first layer along the
    top PC of its input (concentrated: percentile 100); W_K only inside KV head 0 (no rows for the
    other KV heads); W_V of the last layer left untouched (no rows at all)."""
    plants = {}
    for L in layers:
        for kind in kinds:
            if kind == "W_V" and layers[-1] == L:
                continue
            n_out, n_in = arch.weight(L, kind).shape
            g = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
            D = 0.05 * g(n_out, 2) @ g(2, n_in) + 0.005 * g(n_out, n_in)
            if kind == "W_Q" and layers[0] == L:
                D = 0.1 * torch.outer(g(n_out), _pca(acts[f"{L}.attn_in"])[0][:, 0])
            if kind == "W_K" and arch.n_kv > 1:
                D[arch.d_head :] = 0.0
            plants[f"blocks.{L}.{'attn' if kind in ('W_Q', 'W_K', 'W_V', 'W_O') else 'mlp'}.{kind}"] = (L, kind, D)
    return plants


def _hf(folder, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager").eval()


def _hf_case(folder, tmp, tokens, dtype, layers=None, seed=0):
    """Plant ΔW into a plain transformers copy of ``folder``, save it as the tuned checkpoint, and
    return (tuned folder, oracle deltas, arch of the base, base activations)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    family = {"gpt2": "gpt2", "llama": "llama", "gpt_neox": "neox"}[config["model_type"]]
    base_hf, tuned_hf = _hf(folder, dtype), _hf(folder, dtype)
    c = base_hf.config
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    dims = (n_heads, n_kv, c.hidden_size // n_heads)
    base, tuned = Arch(base_hf, LAYOUTS[family], *dims), Arch(tuned_hf, LAYOUTS[family], *dims)
    acts = base.activations(lambda t: base_hf(t), tokens)
    layers = list(range(base.n_layers)) if layers is None else layers
    plants = _plants(base, acts, layers, base.kinds(), torch.Generator().manual_seed(seed))
    for L, kind, D in plants.values():
        tuned.plant(L, kind, D)
    # ΔW as stored: read back from the two Hugging Face models, not from rwasym
    deltas = {name: tuned.weight(L, kind) - base.weight(L, kind) for name, (L, kind, _) in plants.items()}
    out = tmp / "tuned"
    tuned_hf.save_pretrained(out)
    for f in folder.iterdir():  # the tokenizer files
        if f.is_file() and f.suffix != ".safetensors" and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out, deltas, base, acts


PROBE = dict(k=4, null_samples=300, variance=0.9, progress=False)
DK_SAFETY = 10.0
# The tiny models run in float64, where the oracle's forward (plain transformers) and the bridge's
# agree to ≤ 7e-16 relative at every site, except NeoX's z: the bridge's attention differs from
# HF's eager one by 1.0e-7 relative (measured with run_with_cache against these hooks; float32
# somewhere in its rotary or softmax path). Each is given 10× its measured disagreement.
NEOX_EPS = {"z": 1e-6}  # 10x the NeoX z disagreement; every other NeoX site 1e-7 (10x the 8.4e-9 of resid_post)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_every_probe_row_equals_the_oracle_on_hugging_face_models(arch, hf_folder, tmp_path):
    folder = hf_folder[arch][0]
    tokens = torch.randint(3, 96, (16, 24), generator=torch.Generator().manual_seed(7))
    tuned_folder, deltas, base_arch, acts = _hf_case(folder, tmp_path, tokens, torch.float64)
    rows, curves = oracle(base_arch, acts, deltas, PROBE["k"], eps=NEOX_EPS if arch == "neox" else 1e-14)
    base = rwasym.load(folder, dtype=torch.float64)
    compare(rwasym.probe(base, rwasym.load(tuned_folder, dtype=torch.float64), tokens, **PROBE), rows, curves, 300)
    # the tuned checkpoint streamed from its files gives the same rows
    compare(rwasym.probe(base, tuned_folder, tokens, **PROBE), rows, curves, 300)
    # the tolerances are tight (a share of f), and the rows are not trivially equal: sites matter
    share = {key: r["tol"]["fraction"] / r["fraction"] for key, r in rows.items()}
    assert max(share.values()) < (5e-3 if arch == "neox" else 1e-8)  # measured: 1.6e-3 (NeoX), 1e-9
    if not base_arch.lay["parallel"]:
        assert rows[("blocks.0.attn.W_O", None, "residual", "activation")]["fraction"] != pytest.approx(
            float(_fractions(deltas["blocks.0.attn.W_O"], _pca(acts["0.resid_post"])[0], "output")[3]), rel=1e-3
        )


def test_every_probe_row_equals_the_oracle_with_one_kv_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rwasym.testing import perturb_and_save

    torch.manual_seed(3)
    perturb_and_save(
        LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=1,
                intermediate_size=48,
                max_position_embeddings=64,
                vocab_size=96,
                bos_token_id=1,
                eos_token_id=2,
                attn_implementation="eager",
            )
        ),
        tmp_path / "mqa",
        96,
    )
    tokens = torch.randint(3, 96, (16, 24), generator=torch.Generator().manual_seed(8))
    (tmp_path / "t").mkdir()
    tuned_folder, deltas, base_arch, acts = _hf_case(tmp_path / "mqa", tmp_path / "t", tokens, torch.float64)
    rows, curves = oracle(base_arch, acts, deltas, PROBE["k"], eps=1e-14)
    assert {h for (m, h, _, _) in rows if m.endswith("W_K")} == {None, 0}  # one KV head: its row only
    base = rwasym.load(tmp_path / "mqa", dtype=torch.float64)
    compare(rwasym.probe(base, tuned_folder, tokens, **PROBE), rows, curves, 300)


def test_every_probe_row_equals_the_oracle_on_the_native_model(native_cfg):
    base, tuned = rwasym.load(native_cfg, dtype=torch.float64), rwasym.load(native_cfg, dtype=torch.float64)
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    base_arch = Arch(base.bridge.original_model, LAYOUTS["native"], *dims)
    tuned_arch = Arch(tuned.bridge.original_model, LAYOUTS["native"], *dims)
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    acts = base_arch.activations(base.bridge, tokens)
    plants = _plants(base_arch, acts, [0, 1], base_arch.kinds(), torch.Generator().manual_seed(1))
    for L, kind, D in plants.values():
        tuned_arch.plant(L, kind, D)
    deltas = {name: tuned_arch.weight(L, kind) - base_arch.weight(L, kind) for name, (L, kind, _) in plants.items()}
    rows, curves = oracle(base_arch, acts, deltas, PROBE["k"], eps=1e-14)
    compare(rwasym.probe(base, tuned, tokens, **PROBE), rows, curves, 300)
    planted = rows[("blocks.0.attn.W_Q", None, "residual", "activation")]
    assert planted["null_samples"].max() < planted["fraction"]  # the planted top PC: off the null
    # k = 12 > d_head = 8: an O head's inner rows use k = n = 8 (f = 1, r = 1, percentile 100)
    rows, curves = oracle(base_arch, acts, deltas, 12, eps=1e-14)
    assert rows[("blocks.0.attn.W_O", 1, "inner", "activation")]["k"] == 8
    assert (
        float((rows[("blocks.0.attn.W_O", 1, "inner", "activation")]["null_samples"] <= 1 + 1e-12).double().mean())
        == 1.0
    )
    compare(rwasym.probe(base, tuned, tokens, **dict(PROBE, k=12)), rows, curves, 300)


def test_every_probe_row_equals_the_oracle_on_the_real_model(real_folder, tmp_path):
    """SmolLM2-135M's first two blocks (its real weights, embeddings, final norm and tokenizer:
    `real_model_folder(2)`; 9 query / 3 KV heads, d_model 576, d_mlp 1536) in float32: every row and
    curve, with 2304 tokens (> d_mlp: every covariance has full rank). Tolerances: the Davis–Kahan
    bound for the float32 Gram rounding; prediction rows 5e-6 of f (measured 4.4e-7 on the tiny
    float32 models, γ_final run through the float32 norm)."""
    folder = real_folder(2)
    tokens = torch.randint(0, 49152, (9, 256), generator=torch.Generator().manual_seed(10))
    tuned_folder, deltas, base_arch, acts = _hf_case(folder, tmp_path, tokens, torch.float32)
    k = 8
    rows, curves = oracle(base_arch, acts, deltas, k, pred_rel=5e-6)
    base = rwasym.load(folder, dtype=torch.float32)
    result = rwasym.probe(base, tuned_folder, tokens, **dict(PROBE, k=k, null_samples=200, batch_size=3))
    compare(result, rows, curves, 200)
    assert len(rows) > 100
    assert result.config["base_gguf"]["tensor_types"]["Q4_1"] > 0  # the de-quantized GGUF, recorded


def test_base_weight_reference_rows_equal_the_oracle_on_w_base(native_cfg):
    """delta="base_weight" (issue #29): the same rows with ΔW := W_base, no tuned model — every field equal
    to the oracle run on the base's own weights read off the HF modules."""
    base = rwasym.load(native_cfg, dtype=torch.float64)
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    base_arch = Arch(base.bridge.original_model, LAYOUTS["native"], *dims)
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    acts = base_arch.activations(base.bridge, tokens)
    weights = {s.name: base_arch.weight(s.layer, s.kind) for s in base.matrices()}
    rows, curves = oracle(base_arch, acts, weights, PROBE["k"], eps=1e-14)
    result = rwasym.probe(base, None, tokens, delta="base_weight", **PROBE)
    compare(result, rows, curves, 300)
    assert {r["delta"] for r in result.rows} == {"base_weight"}


def test_noise_floor_rows_equal_the_oracle_on_the_replicate_difference(native_cfg):
    """delta="noise_floor" (issue #29): rows of W_replicate − W_tuned (two tuned runs differing only in seed)
    against the base's subspaces, every field equal to the oracle on that difference read off the HF modules."""
    from rwasym.testing import perturb

    base = rwasym.load(native_cfg, dtype=torch.float64)
    tuned = perturb(rwasym.load(native_cfg, dtype=torch.float64), seed=1)
    replicate = perturb(rwasym.load(native_cfg, dtype=torch.float64), seed=2)
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    arch = {m: Arch(m.bridge.original_model, LAYOUTS["native"], *dims) for m in (base, tuned, replicate)}
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    acts = arch[base].activations(base.bridge, tokens)
    diffs = {
        s.name: arch[replicate].weight(s.layer, s.kind) - arch[tuned].weight(s.layer, s.kind) for s in base.matrices()
    }
    rows, curves = oracle(arch[base], acts, diffs, PROBE["k"], eps=1e-14)
    result = rwasym.probe(base, tuned, tokens, delta="noise_floor", replicate=replicate, **PROBE)
    compare(result, rows, curves, 300)
    assert {r["delta"] for r in result.rows} == {"noise_floor"}
    with pytest.raises(rwasym.RwasymError, match="needs replicate="):
        rwasym.probe(base, tuned, tokens, delta="noise_floor", **PROBE)
    with pytest.raises(rwasym.RwasymError, match="pass delta='noise_floor'"):
        rwasym.probe(base, tuned, tokens, replicate=replicate, **PROBE)


def test_random_delta_rows_realise_the_gradient_shaped_null(native_cfg):
    """delta="random_delta" (issue #29): each matrix gets one draw of Σ_t ξ_t a_tᵀ over the capture's tokens. Over
    seeds, a row's mean f must approach tr(U_kᵀ M U_k)/tr M of the oracle's uncentred input M (input side) and
    k/n on the output side — the analytic value every row carries as ``random_delta_fraction``. Draws depend on
    the seed and the matrix only."""
    base = rwasym.load(native_cfg, dtype=torch.float64)
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    opts = dict(k=4, null_samples=0, heads=False, curves=False, progress=False, delta="random_delta")
    results = [rwasym.probe(base, None, tokens, seed=s, **opts) for s in range(40)]
    for r in results[0].rows:
        assert r["delta"] == "random_delta"
    key = lambda r: (r["matrix"], r["stream"], r["subspace"])  # noqa: E731
    draws: dict = {}
    for res in results:
        for r in res.rows:
            draws.setdefault(key(r), []).append(r["fraction"])
    expected = {key(r): r for r in results[0].rows}
    # the analytic value, by hand: the oracle's uncentred input second moment and PCA/prediction bases
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    arch = Arch(base.bridge.original_model, LAYOUTS["native"], *dims)
    acts = arch.activations(base.bridge, tokens)
    pred, _ = arch.prediction_basis()
    checked = 0
    for (name, stream, subspace), f in draws.items():
        row = expected[(name, stream, subspace)]
        L, kind = int(name.split(".")[1]), name.split(".")[-1]
        if row["side"] == "input":
            site = {"W_Q": "attn_in", "W_K": "attn_in", "W_V": "attn_in", "W_O": "z", "W_out": "hidden"}
            x = acts[f"{L}.{site.get(kind, 'mlp_in')}"]
            U = pred if subspace == "prediction" else _pca(x)[0]  # an input-side activation row: the PCA of x
            M = x.T @ x
            want = float(torch.trace(U[:, :4].T @ M @ U[:, :4]) / torch.trace(M))
        else:
            want = 4 / row["n"]
        assert row["random_delta_fraction"] == pytest.approx(want, rel=1e-6, abs=1e-9), (name, subspace)
        mean = sum(f) / len(f)
        se = (sum((v - mean) ** 2 for v in f) / (len(f) - 1) / len(f)) ** 0.5
        assert abs(mean - want) <= 4 * se + 0.01, (name, stream, subspace, mean, want, se)
        checked += 1
    assert checked == len(expected) > 20
    # the draw of a matrix is the same whichever other matrices the probe selects
    one = rwasym.probe(base, None, tokens, seed=3, matrices="blocks.1.attn.W_Q", **opts)
    same = {key(r): r["fraction"] for r in results[3].rows}
    for r in one.rows:
        assert r["fraction"] == same[key(r)]


def test_prediction_variants_equal_the_oracle(native_cfg):
    """subspaces prediction_centered and prediction_fisher (issue #29), by hand on the HF module: the left singular
    vectors of the vocabulary-centred diag(γ)·W_U, and the eigenvectors of the explicit per-token sum
    (1/N) Σ_t W̃_U (diag p_t − p_t p_tᵀ) W̃_Uᵀ with p_t the plain module's softmax — every row field, each with its
    own ρ_C (C = that Gram or metric)."""
    from rwasym.testing import perturb

    base = rwasym.load(native_cfg, dtype=torch.float64)
    tuned = perturb(rwasym.load(native_cfg, dtype=torch.float64), seed=1)
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    arch = {m: Arch(m.bridge.original_model, LAYOUTS["native"], *dims) for m in (base, tuned)}
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    acts = arch[base].activations(base.bridge, tokens)
    root = base.bridge.original_model
    w_u = _get(root, LAYOUTS["native"]["unembed"]).weight.detach().double().T  # (d_model, vocab)
    w = _get(root, LAYOUTS["native"]["final"]).weight.detach().double()[:, None] * w_u

    def eig(m):
        evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
        order = evals.argsort(descending=True)
        ev = evals[order].clamp_min(0)
        return evecs[:, order], ev / ev.sum()

    centred = w - w.mean(1, keepdim=True)
    with torch.no_grad():
        logits = root(tokens)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits if hasattr(logits, "logits") else logits[0]
    probs = torch.softmax(logits.double().reshape(-1, logits.shape[-1]), -1)
    fisher = sum(w @ (torch.diag(p) - torch.outer(p, p)) @ w.T for p in probs) / probs.shape[0]
    predictions = {
        "prediction": arch[base].prediction_basis(),
        "prediction_centered": eig(centred @ centred.T),
        "prediction_fisher": eig(fisher),
    }
    deltas = {s.name: arch[tuned].weight(s.layer, s.kind) - arch[base].weight(s.layer, s.kind) for s in base.matrices()}
    rows, curves = oracle(arch[base], acts, deltas, PROBE["k"], eps=1e-14, pred_rel=1e-7, predictions=predictions)
    subspaces = "activation,prediction,prediction_centered,prediction_fisher"
    result = rwasym.probe(base, tuned, tokens, subspaces=subspaces, **PROBE)
    compare(result, rows, curves, 300)
    assert result.config["fisher_tokens"] == tokens.numel()
    # the centred basis differs from the raw one here (the mean column is not negligible)
    raw = {(r["matrix"], r["head"]): r["fraction"] for r in result.rows if r["subspace"] == "prediction"}
    cen = {(r["matrix"], r["head"]): r["fraction"] for r in result.rows if r["subspace"] == "prediction_centered"}
    assert max(abs(raw[key] - cen[key]) for key in raw) > 1e-3
    with pytest.raises(rwasym.RwasymError, match="subspaces="):
        rwasym.probe(base, tuned, tokens, subspaces="activation,fisher", **PROBE)
    # padding is left out: right-padded rows give the unpadded positions' own distributions (causal attention)
    from rwasym.hooks.activations import prediction_statistics

    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[::2, 15:] = False
    stats = prediction_statistics(base, {"input_ids": tokens, "attention_mask": mask.long()}, batch_size=5)
    kept = probs[mask.reshape(-1)]
    assert stats.count == int(mask.sum())
    assert torch.allclose(stats.p_sum, kept.sum(0), rtol=1e-10, atol=1e-12)
    g = kept @ w.T  # γ is measured by running the norm in rwasym (≈2e-6 from the parameter here)
    assert torch.allclose(stats.g.second_moment(), g.T @ g / len(g), rtol=1e-5, atol=1e-9)
    # a float32 model projects p_t in float32 and sums in float64: the metric stays within float32 rounding
    single = prediction_statistics(rwasym.load(native_cfg), tokens, batch_size=5)
    assert torch.allclose(single.fisher(w), fisher, rtol=1e-4, atol=1e-6 * float(fisher.abs().max()))


def test_sink_exclusion_rows_equal_the_oracle_without_those_tokens(native_cfg):
    """exclude_positions / exclude_tokens (issue #29): every row equals the oracle run on the HF activations with
    the first token of each row and every occurrence of one token id removed (the model still reads them)."""
    from rwasym.hooks.activations import exclusion_mask
    from rwasym.testing import perturb

    base = rwasym.load(native_cfg, dtype=torch.float64)
    tuned = perturb(rwasym.load(native_cfg, dtype=torch.float64), seed=1)
    dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
    arch = {m: Arch(m.bridge.original_model, LAYOUTS["native"], *dims) for m in (base, tuned)}
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    keep = ((torch.arange(24) != 0)[None, :] & (tokens != 7)).reshape(-1)
    assert 0 < int((~keep).sum()) < keep.numel() and bool((tokens == 7).any())
    acts = {site: x[keep] for site, x in arch[base].activations(base.bridge, tokens).items()}
    deltas = {s.name: arch[tuned].weight(s.layer, s.kind) - arch[base].weight(s.layer, s.kind) for s in base.matrices()}
    rows, curves = oracle(arch[base], acts, deltas, PROBE["k"], eps=1e-14)
    result = rwasym.probe(base, tuned, tokens, exclude_positions=(0,), exclude_tokens=(7,), **PROBE)
    compare(result, rows, curves, 300)
    assert result.config["n_tokens"] == int(keep.sum())
    # positions count from each row's first unpadded token: left padding moves "position 0"
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ids = torch.tensor([[3, 3, 5, 7, 5], [7, 5, 5, 2, 7]])
    want = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(exclusion_mask(ids, mask, (0, 1), (7,)), want)
    with pytest.raises(rwasym.RwasymError, match="non-negative"):
        rwasym.probe(base, tuned, tokens, exclude_positions=(-1,), **PROBE)


@pytest.mark.parametrize("arch", ["native", "neox"])
def test_normalized_residual_rows_equal_the_oracle(arch, native_cfg, hf_folder, tmp_path):
    """subspaces activation_normalized (issue #29): write matrices against the PCA of the normalised residual the
    next sublayer reads (block's MLP input for a sequential W_O, the next block's attention input, the final norm's
    output after the last block; NeoX's parallel blocks: the next attention input), by hand on the HF module."""
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(9))
    subspaces = "activation,prediction,activation_normalized"
    if arch == "native":
        from rwasym.testing import perturb

        base = rwasym.load(native_cfg, dtype=torch.float64)
        tuned = perturb(rwasym.load(native_cfg, dtype=torch.float64), seed=1)
        dims = (base.cfg.n_heads, base.cfg.n_key_value_heads, base.cfg.d_head)
        arch_b = Arch(base.bridge.original_model, LAYOUTS["native"], *dims)
        arch_t = Arch(tuned.bridge.original_model, LAYOUTS["native"], *dims)
        acts = arch_b.activations(base.bridge, tokens)
        deltas = {s.name: arch_t.weight(s.layer, s.kind) - arch_b.weight(s.layer, s.kind) for s in base.matrices()}
        rows, curves = oracle(arch_b, acts, deltas, PROBE["k"], eps=1e-14, normalized=True)
        result = rwasym.probe(base, tuned, tokens, subspaces=subspaces, **PROBE)
    else:
        folder, _ = hf_folder["neox"]
        tuned_folder, deltas, arch_b, acts = _hf_case(folder, tmp_path, tokens, torch.float64)
        rows, curves = oracle(arch_b, acts, deltas, PROBE["k"], eps=NEOX_EPS, normalized=True)
        result = rwasym.probe(
            rwasym.load(folder, dtype=torch.float64), tuned_folder, tokens, subspaces=subspaces, **PROBE
        )
    compare(result, rows, curves, 300)
    assert any(r["subspace"] == "activation_normalized" and r["site"] == "ln_final.hook_out" for r in result.rows)
