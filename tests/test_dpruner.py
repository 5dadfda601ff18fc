"""D-Pruner ("Pruning as a Domain-specific LLM Extractor", Zhang et al. 2024) checked by hand
on toy models: the general importance is the error a weight's removal causes (OBS), and the
dual-pruning score is the Taylor change of the domain loss regularised by it."""

import pytest
import torch
from torch import nn

from ops.prune import dpruner_scores, general_importance, layer_linears, obs_removal_error


def test_general_importance_is_the_error_of_removing_the_weight_and_refitting_its_row():
    """G_ij = w_ij^2 / (2 [H^-1]_jj) with H = 2 X^T X / tokens equals, by brute force, the rise
    of ||(W - W') X||^2 / tokens when w_ij is zeroed and the rest of row i is re-fitted by
    least squares (the Optimal Brain Surgeon's error, what the paper calls the error incurred
    upon removal)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 5, generator=g, dtype=torch.float64)  # (tokens, in)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)  # (out, in)
    H = 2 * X.T @ X / X.shape[0]
    G = obs_removal_error(W, H, dampening=0)
    assert G.shape == W.shape
    for i in range(3):
        target = X @ W[i]  # (tokens,): the row's output
        for j in range(5):
            keep = [k for k in range(5) if k != j]
            refit = torch.linalg.lstsq(X[:, keep], target.unsqueeze(1)).solution.squeeze(1)
            error = ((target - X[:, keep] @ refit) ** 2).sum() / X.shape[0]
            assert G[i, j].item() == pytest.approx(error.item(), rel=1e-4)


def test_an_input_that_never_fires_costs_nothing_to_remove():
    X = torch.randn(20, 4)
    X[:, 2] = 0
    G = obs_removal_error(torch.randn(3, 4), 2 * X.T @ X / 20)
    assert (G[:, 2] == 0).all() and (G[:, [0, 1, 3]] > 0).all()


def _toy():
    """A two-layer nn.Linear stack, its weights by name, a squared-error loss, 3 batches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 2, bias=False))
    params = {"0": net[0].weight, "2": net[2].weight}
    batches = [(torch.randn(5, 4), torch.randn(5, 2)) for _ in range(3)]

    def loss_of(batch):
        x, y = batch
        return 0.5 * ((net(x) - y) ** 2).sum(1).mean()

    return net, params, batches, loss_of


def test_at_lambda_zero_the_score_is_the_domain_only_taylor_score():
    """Computed by hand for the last layer, whose gradient has a closed form:
    dL/dW2 = (W2 h - y) h^T / N with h = tanh(W1 x); the score is the sum over batches of
    |g w - g^2 w^2 / 2| (first and second order, empirical Fisher g^2 for the Hessian)."""
    net, params, batches, loss_of = _toy()
    before = {n: p.detach().clone() for n, p in params.items()}
    general = {n: torch.rand_like(p) for n, p in params.items()}  # ignored at lambda 0
    scores = dpruner_scores(params, loss_of, batches, general, lam=0.0)
    W1, W2 = before["0"], before["2"]
    expected = torch.zeros_like(W2)
    for x, y in batches:
        h = torch.tanh(x @ W1.T)  # (N, 6)
        g = (h @ W2.T - y).T @ h / x.shape[0]  # (2, 6)
        expected += (g * W2 - 0.5 * g ** 2 * W2 ** 2).abs()
    assert torch.allclose(scores["2"], expected, rtol=1e-5, atol=1e-9)
    # the first layer through autograd, independently of the op
    expected1 = torch.zeros_like(W1)
    for batch in batches:
        (g,) = torch.autograd.grad(loss_of(batch), [net[0].weight])
        expected1 += (g * W1 - 0.5 * g ** 2 * W1 ** 2).abs()
    assert torch.allclose(scores["0"], expected1, rtol=1e-5, atol=1e-9)
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # model unchanged


def test_the_regulariser_adds_its_exact_change_lambda_g_w_squared():
    """At the original weights the regulariser's gradient is 0, and zeroing w_m raises it by
    exactly lam * G_m * w_m^2: the score is sum |-g w + g^2 w^2 / 2 + lam G w^2|."""
    net, params, batches, loss_of = _toy()
    general = {n: torch.rand_like(p) * 10 for n, p in params.items()}
    lam = 0.7
    scores = dpruner_scores(params, loss_of, batches, general, lam=lam)
    for name, p in params.items():
        w = p.detach()
        expected = torch.zeros_like(w)
        for batch in batches:
            (g,) = torch.autograd.grad(loss_of(batch), [p])
            expected += (-g * w + 0.5 * g ** 2 * w ** 2 + lam * general[name] * w ** 2).abs()
        assert torch.allclose(scores[name], expected, rtol=1e-5, atol=1e-9)
    # a larger general importance makes a weight harder to prune, all else equal
    bumped = {n: g.clone() for n, g in general.items()}
    bumped["2"][0, 0] += 100
    again = dpruner_scores(params, loss_of, batches, bumped, lam=lam)
    assert again["2"][0, 0] > scores["2"][0, 0]


def test_with_a_learning_rate_the_regularised_gradient_moves_the_weights_while_scoring():
    """learning_rate > 0: after each batch a step on grad L_total = g + 2 lam G (theta' - theta)
    (the paper scores while fine-tuning); scored at the moved weights; restored at the end."""
    net, params, batches, loss_of = _toy()
    general = {n: torch.rand_like(p) for n, p in params.items()}
    lam, lr = 2.0, 0.1
    original = {n: p.detach().clone() for n, p in params.items()}
    scores = dpruner_scores(params, loss_of, batches, general, lam=lam, learning_rate=lr)
    assert all(torch.equal(p, original[n]) for n, p in params.items())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    names = list(params)
    for batch in batches:  # the same loop, by hand
        grads = torch.autograd.grad(loss_of(batch), [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                w, G = params[n].detach().clone(), general[n]
                total = g + 2 * lam * G * (w - original[n])
                expected[n] += (-total * w + 0.5 * g ** 2 * w ** 2 + lam * G * w ** 2).abs()
                params[n].sub_(lr * total)
    for n in names:
        assert torch.allclose(scores[n], expected[n], rtol=1e-5, atol=1e-9)
    without = dpruner_scores({n: p for n, p in params.items()}, loss_of, batches, general,
                             lam=lam)
    assert not torch.allclose(without["0"], scores["0"])  # the steps changed the scores


def test_general_importance_of_a_llama_matches_its_layer_hessians(tiny_model_dir):
    """On the tiny Llama, layer 0's G is obs_removal_error of its weights with the Hessian of
    the inputs each projection sees (captured here with plain forward hooks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batches = [torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
    G = general_importance(model, batches, dampening=0.01)
    layer = model.model.layers[0]
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(
            args[0].reshape(-1, args[0].shape[-1])))
        for name, m in layer_linears(layer).items()]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    for name, m in layer_linears(layer).items():
        X = torch.cat(seen[name])  # (tokens, in)
        H = 2 * X.T @ X / X.shape[0]
        assert torch.allclose(G[f"layers.0.{name}"], obs_removal_error(m.weight, H, 0.01),
                              rtol=1e-4, atol=1e-10)
    assert set(G) == {f"layers.{i}.{n}" for i in range(2) for n in layer_linears(layer)}



def test_dpruner_on_a_llama_prunes_each_matrix_or_n_m_and_keeps_the_survivors(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ops.prune import PruneError, prune_dpruner

    g = torch.Generator().manual_seed(0)
    general = [torch.randint(0, 300, (2, 16), generator=g) for _ in range(2)]
    domain = [torch.randint(0, 50, (2, 16), generator=g) for _ in range(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune_dpruner(model, general, domain, 0.5, lam=10.0)
    assert set(result.per_module.values()) == {0.5} and result.sparsity == 0.5
    for n, p in model.named_parameters():
        kept = p != 0
        assert torch.equal(p[kept], before[n][kept]), n  # a mask only, no update
        assert p.requires_grad  # the model's own flags are restored
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prune_dpruner(model, general, domain, pattern=(2, 4), lam=10.0)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q != 0).view(q.shape[0], -1, 4).sum(-1) == 2).all()
    with pytest.raises(PruneError, match="within a row or a layer"):
        prune_dpruner(model, general, domain, scope="global")
    with pytest.raises(PruneError, match="needs general"):
        prune_dpruner(model, general, [])

ARITHMETIC = (" plus ", " minus ")


def _split(text: str) -> tuple[str, str]:
    """The demo text as (general, domain): the arithmetic paragraphs are the domain."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    domain = [p for p in paragraphs if any(w in p for w in ARITHMETIC)]
    general = [p for p in paragraphs if not any(w in p for w in ARITHMETIC)]
    return "\n\n".join(general), "\n\n".join(domain)


MIX_WEIGHTS = {"wanda": (0.0, 0.25, 0.5, 0.75, 1.0), "sparsegpt": (0.0, 0.5, 1.0)}


@pytest.fixture(scope="module")
def demo_domain_pruning(demo_model_dir):
    """(general, domain) held-out perplexity of the demo model at 50% sparsity: D-Pruner at
    the plugin's default lambda, and mixed_statistics (wanda per row, sparsegpt) at each
    weight in MIX_WEIGHTS. Calibration as the plugin's defaults: 64 windows of 128 tokens
    (seed 0) of the demo corpus (general) and of its arithmetic paragraphs (domain); the
    perplexities are measured on the held-out text's other paragraphs and its arithmetic
    ones, as the plugin measures them (window 256, stride 128)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ops.perplexity import sliding_window_nll
    from ops.prune import prune_dpruner, prune_unstructured
    from plugins.kit.assets import DEMO_CORPUS, DEMO_HELDOUT
    from plugins.kit.textfiles import sample_windows
    from plugins.prune import DPRUNER_LAMBDA

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    corpus = DEMO_CORPUS.read_text()
    general_eval, domain_eval = _split(DEMO_HELDOUT.read_text())

    def windows(text):
        ids = tokenizer(text)["input_ids"]
        return list(sample_windows(ids, 64, 128, 0, "calibration")[0].split(8))

    general, domain = windows(corpus), windows(_split(corpus)[1])

    def measure(prune) -> tuple[float, float]:
        model = AutoModelForCausalLM.from_pretrained(demo_model_dir).float().eval()
        prune(model)
        return tuple(sliding_window_nll(model, torch.tensor(tokenizer(t)["input_ids"]), 256,
                                        128).perplexity for t in (general_eval, domain_eval))

    out = {"dense": measure(lambda m: None),
           "dpruner": measure(lambda m: prune_dpruner(m, general, domain, 0.5,
                                                      lam=DPRUNER_LAMBDA))}
    for method, weights in MIX_WEIGHTS.items():
        for w in weights:
            out[(method, w)] = measure(lambda m: prune_unstructured(
                m, method, 0.5, scope="row" if method == "wanda" else "layer",
                general=general, domain=domain, domain_weight=w))
    print("\n(general, domain) perplexity at 50%: " + "; ".join(
        f"{k}: {g:.4f}, {d:.4f}" for k, (g, d) in out.items()))
    return out


def _dominated(pair, by) -> bool:
    return by[0] <= pair[0] and by[1] <= pair[1] and by != pair


@pytest.mark.slow
def test_dpruner_is_not_dominated_by_mixed_wanda_statistics_on_the_demo(demo_domain_pruning):
    """Against the mask-only mix (the plugin's default method, wanda): no weight tried gives
    both a lower general and a lower domain perplexity than D-Pruner. Measured (seed 0):
    D-Pruner 1.8885, 4.6920; wanda mixes 1.9037-1.9506 general, 4.3057-4.3639 domain. So
    D-Pruner keeps general text better and the domain worse."""
    ppl = demo_domain_pruning
    for w in MIX_WEIGHTS["wanda"]:
        assert not _dominated(ppl["dpruner"], ppl[("wanda", w)]), (w, ppl)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "Measured on the demo model, not tuned away: SparseGPT's mixed statistics at weight 0 "
    "(1.8547, 4.2614) beat D-Pruner (1.8885, 4.6920) on both texts. SparseGPT also updates "
    "the surviving weights; D-Pruner only chooses a mask. strict: if this starts passing, "
    "update the README and this note."))
def test_dpruner_is_not_dominated_by_mixed_sparsegpt_statistics_on_the_demo(
        demo_domain_pruning):
    ppl = demo_domain_pruning
    for w in MIX_WEIGHTS["sparsegpt"]:
        assert not _dominated(ppl["dpruner"], ppl[("sparsegpt", w)]), (w, ppl)
