"""Autoscaling settings as the gateways publish them, for the policy in the Serve controller.

Ray Serve folds a deployment's autoscaling policy (its import path and policy_kwargs) and the
application's args into the application's code version (ray/serve/_private/deploy_utils.py,
get_app_code_version): a change of either rebuilds the application and replaces every replica,
engines included. So the settings do not travel there. They are part of the gateways'
user_config (a change is a reconfigure); each gateway publishes them in Ray's GCS key-value
store when reconfigured, and the policy reads them back (serving.autoscaling.ray_policy). The
gateways always run, so a model scaled to zero still gets its new settings.
"""

from __future__ import annotations

import json

NAMESPACE = "keel"


def _key(model: str) -> bytes:
    return f"autoscaling/{model}".encode()


def publish(settings_by_model: dict[str, dict]) -> None:
    """Store each model's settings (AutoscalingConfig as JSON). Outside Ray: nothing to do."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return
    for model, settings in settings_by_model.items():
        internal_kv._internal_kv_put(
            _key(model), json.dumps(settings, sort_keys=True).encode(), overwrite=True, namespace=NAMESPACE
        )


def read(model: str) -> dict | None:
    """The settings last published for `model`, or None (none yet, or outside Ray)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    raw = internal_kv._internal_kv_get(_key(model), namespace=NAMESPACE)
    return json.loads(raw) if raw else None
