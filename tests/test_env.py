import sys

from fastsd import env


def test_a_test_run_is_a_script(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert env.runtime() == "script"


def test_colab_is_told_by_its_environment(monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    assert env.runtime() == "colab"


def test_jupyter_is_told_by_a_kernel(monkeypatch):
    class Shell:
        kernel = object()

    class FakeIPython:
        @staticmethod
        def get_ipython():
            return Shell()

    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.setitem(sys.modules, "IPython", FakeIPython)
    assert env.runtime() == "jupyter"


def test_device_on_this_machine_is_the_cpu():
    info = env.device_info()
    assert info.device == "cpu" and not info.is_cuda
    assert info.vram_total_gib is None and info.name


def test_report_names_the_workspace_and_versions(workspace):
    report = env.report(workspace)
    assert report["workspace"] == str(workspace)
    assert report["runtime"] == "script"
    assert report["device"] == "cpu"
    assert report["torch"].startswith("2.")
    assert report["diffusers"] and report["transformers"]


def test_reachable_tells_a_listening_port_from_a_closed_one():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert env.reachable("127.0.0.1", port, timeout=2)
    assert not env.reachable("127.0.0.1", port, timeout=2)


def test_each_process_asks_about_its_own_gpu(monkeypatch):
    """Under accelerate launch each process is told its GPU by LOCAL_RANK before accelerate
    picks it; asking about GPU 0 from every process opened a CUDA context there in each."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert env.cuda_index(4) == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env.cuda_index(4) == 3
    assert env.cuda_index(2) == 0  # more processes than GPUs: not an index to ask about
    monkeypatch.setenv("LOCAL_RANK", "x")
    assert env.cuda_index(4) == 0
