"""Ray execution: each trial is a Ray task; results flow back to the driver, the only writer of the store."""

from __future__ import annotations

from typing import Any

from loraplace.errors import LoraplaceError
from loraplace.store import Owner, Store


def _trial_task(spec_json: str, out_dir: str) -> dict[str, Any]:
    # Runs in a Ray worker: no store access here, only the result goes back.
    from loraplace.trial import TrialSpec, run_trial

    result = run_trial(TrialSpec.model_validate_json(spec_json), out_dir=out_dir)
    return result.store_payload()


def run_with_ray(study, store: Store, study_id: int, by_id: dict, store_path, summary, retry_failed: bool,
                 address: str | None, on_trial_end=None) -> None:
    try:
        import ray
    except ImportError:
        raise LoraplaceError("the ray backend needs Ray", "pip install 'loraplace[ray]'") from None
    from loraplace.study import artifacts_dir

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    owner = Owner.current()
    remote = ray.remote(_trial_task).options(num_cpus=study.resources.cpus, num_gpus=study.resources.gpus,
                                              max_retries=0)
    pending: dict[Any, str] = {}
    remaining = set(by_id)
    try:
        while (claimed := store.claim_trial(study_id, owner, retry_failed=retry_failed, only=remaining)) is not None:
            remaining.discard(claimed.id)
            out_dir = str(artifacts_dir(store_path) / claimed.id)
            pending[remote.remote(by_id[claimed.id].spec.model_dump_json(), out_dir)] = claimed.id
            summary.ran += 1
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for trial_id in pending.values():
                store.heartbeat(trial_id, owner)
            for ref in ready:
                trial_id = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker's exception fails that trial only
                    store.fail_trial(trial_id, f"{type(exc).__name__}: {str(exc)[-500:]}", owner=owner)
                    summary.failed += 1
                    continue
                if result["status"] == "done":
                    store.finish_trial(trial_id, result, owner)
                    summary.done += 1
                else:
                    store.fail_trial(trial_id, result.get("error") or "failed", result.get("failed_step"), owner)
                    summary.failed += 1
                if on_trial_end is not None:
                    on_trial_end(by_id[trial_id], result)
    except KeyboardInterrupt:
        for ref, trial_id in pending.items():
            ray.cancel(ref, force=True)
            store.interrupt_trial(trial_id, "interrupted by the user (Ctrl-C)", owner)
        raise
    finally:
        if started_here:
            ray.shutdown()
