import agiformer_kernels


def test_public_api_is_exported():
    for name in agiformer_kernels.__all__:
        assert callable(getattr(agiformer_kernels, name)), name
    report = agiformer_kernels.available_backends("cpu")
    for op in ("linear_attention", "sliding_window_attention", "gru_patch_decode", "gru_patch_sample"):
        assert op in report, f"{op} registers no backend"
        assert report[op]["reference"] == "available"


def test_extension_libraries_bind_to_the_process_cxx_runtime():
    """Loading an op's library first makes torch's libstdc++ global, so a library that carries its own copy of
    libstdc++ (a compiler that links it statically) still binds to the process's: with its own copy, formatting
    a number in a C++ error message segfaults."""
    import ctypes

    import pytest

    from agiformer_kernels import extension

    try:
        extension.load("gru_patch")
    except extension.ExtensionError as e:
        pytest.skip(str(e))
    ctypes.CDLL(None)["_ZNSt6locale7classicEv"]  # std::locale::classic(), found in the global scope
