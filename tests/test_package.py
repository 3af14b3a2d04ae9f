import agiformer_kernels


def test_public_api_is_exported():
    for name in agiformer_kernels.__all__:
        assert callable(getattr(agiformer_kernels, name)), name
    report = agiformer_kernels.available_backends("cpu")
    for op in ("linear_attention", "sliding_window_attention", "gru_patch_decode", "gru_patch_sample"):
        assert op in report, f"{op} registers no backend"
        assert report[op]["reference"] == "available"
