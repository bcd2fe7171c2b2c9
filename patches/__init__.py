"""The only code in vllm_sink that touches vLLM's internals. Installed as
``vllm_sink.patches``.

Grouped by the process each part runs in (vLLM V1 runs a frontend/API process, an
EngineCore process with the scheduler, and one process per worker):

* ``frontend/``    engine-config hook: reads ``additional_config["sink"]``, sets the
                   engine settings the plugin needs, refuses what it cannot honour,
                   and selects the two classes below through vLLM's own options; each
                   request's ``"sink"`` field and session id at admission; the
                   ``/metrics`` collector; the version guard;
* ``engine_core/`` scheduler class (``scheduler_cls``) + KV-cache spec and manager
                   registered in vLLM's KV-spec registry: the sink + ring block policy,
                   persistent sessions, the host budget of preempted streams' KV;
* ``worker/``      worker class (``worker_cls``) + model-runner mixin: virtual
                   sequences, cache-relative positions, key re-rotation, preempted
                   streams' KV saved and restored.

``patches/README.md`` is the ledger: why, how, verified versions, removal plan.
"""

from __future__ import annotations

import logging

from vllm_sink.patches._patching import (
    PatchError,
    describe_releases,
    version_supported,
    vllm_version,
)

logger = logging.getLogger("vllm.vllm_sink")

_REGISTERED = False


def register_plugin() -> None:
    """Body of ``vllm_sink.register()``: idempotent, fail-closed on an unsupported vLLM."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    if not version_supported():
        logger.warning(
            "vllm_sink %s supports vLLM %s only; this is vLLM %s. The plugin stays "
            "inert: engines without a \"sink\" section run as plain vLLM, and one with a "
            "\"sink\" section is refused at startup.",
            _plugin_version(),
            describe_releases(),
            vllm_version(),
        )
        from vllm_sink.patches.frontend import version_guard

        try:
            version_guard.PATCH.apply()
        except PatchError as e:  # nothing to wrap on this release: the warning stands
            logger.warning("vllm_sink: could not install the version guard: %s", e)
        return
    from vllm_sink.patches.frontend import engine_args

    engine_args.PATCH.apply()


def _plugin_version() -> str:
    from vllm_sink._version import __version__

    return __version__


__all__ = ["PatchError", "register_plugin"]
