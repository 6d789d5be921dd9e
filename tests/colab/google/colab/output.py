"""Stand-in for ``google.colab.output``: records calls, renders nothing."""

from __future__ import annotations

calls: list[tuple] = []


def enable_custom_widget_manager() -> None:
    calls.append(("enable_custom_widget_manager",))


def disable_custom_widget_manager() -> None:
    calls.append(("disable_custom_widget_manager",))


def clear(wait: bool = False) -> None:
    calls.append(("clear", wait))


def eval_js(script: str, ignore_result: bool = False, timeout_sec=None):
    calls.append(("eval_js", script))
    return None


def serve_kernel_port_as_window(port: int, path: str = "/", anchor_text=None) -> None:
    calls.append(("serve_kernel_port_as_window", port, path))


def serve_kernel_port_as_iframe(port: int, path: str = "/", height: int = 400) -> None:
    calls.append(("serve_kernel_port_as_iframe", port, path, height))
