import math

import pytest
import torch

from ops.perplexity import sliding_window_nll, windows


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 16, 16), (37, 8, 3), (5, 8, 4)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, score_from in windows(n, window, stride):
        assert end - begin <= window
        scored += list(range(max(score_from, begin + 1), end))
    assert scored == list(range(1, n))


def naive_nll(model, ids, window, stride):
    """One window at a time, one token at a time: the definition, not the fast path."""
    total, count = 0.0, 0
    for begin, end, score_from in windows(ids.numel(), window, stride):
        with torch.no_grad():
            logits = model(input_ids=ids[begin:end][None]).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        for t in range(max(score_from, begin + 1), end):
            total -= logp[t - begin - 1, ids[t]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("window,stride,batch", [(32, 16, 1), (32, 16, 4), (64, 64, 3),
                                                 (48, 7, 8)])
def test_matches_a_naive_loop(tiny_model_dir, window, stride, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (203,))
    result = sliding_window_nll(model, ids, window, stride, batch_size=batch)
    total, count = naive_nll(model, ids, window, stride)
    assert result.tokens == count == 202
    assert result.nll_sum == pytest.approx(total, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_rejects_bad_windows():
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)
    with pytest.raises(ValueError, match="window"):
        windows(10, 1, 1)
