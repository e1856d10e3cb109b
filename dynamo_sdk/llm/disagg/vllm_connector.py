"""A vLLM KV connector for disaggregated prefill through shared storage (works on vLLM's CPU build).

vLLM moves KV between engines only through its KV-connector interface (`KVConnectorBase_V1`):
the scheduler asks a connector how many of a prompt's tokens it can supply, and the model runner
calls it to save each layer's KV after attention and to load KV into freshly allocated blocks
before a forward pass. vLLM's `ExampleConnector` does this with one safetensors file per layer
in a shared folder and runs on the CPU build, but it is a debugging aid: every prompt any engine
computes is saved (decode workers' local prefills too), files are keyed by a hash of the prompt
and never deleted, and it saves a prompt on its first scheduled step even when chunked prefill
has computed only part of it.

`DynamoStorageConnector` keeps ExampleConnector's file format and its layer save/load code (the
part that knows vLLM's per-layer cache views) and replaces the bookkeeping around it:

* Only requests that ask for it are touched, through vLLM's per-request ``kv_transfer_params``
  (``SamplingParams.extra_args["kv_transfer_params"]``): ``{"dynamo_kv": {"store": key}}`` on a
  prefill worker, ``{"dynamo_kv": {"load": key}}`` on a decode worker. Everything else is served
  as if no connector were configured.
* A stored prompt lives in ``<shared_storage_path>/<key>``, the key naming the decode worker and
  the transfer (`storage_key`), so the decode side loads exactly what its prefill worker wrote and
  a dead decode worker's leftovers can be found and removed (`sweep_storage`).
* A prompt is saved in the step that completes its prefill (chunked prefill included), and
  reported back when the request finishes: the output's ``kv_transfer_params`` carry
  ``{"dynamo_kv": {"stored": tokens}}`` or ``{"dynamo_kv": {"loaded": tokens}}``.
* The decode side deletes a stored prompt when its request finishes (by then the load has run,
  or never will): storage holds only prompts whose decode is still under way.

The number of tokens stored is the prompt's length minus one, rounded down to whole blocks: the
last prompt token is always computed by the decode engine (vLLM needs at least one token to
compute to produce logits), and vLLM hands out external hits in whole blocks.

Limits (see docs/disagg_vllm.md): tensor parallelism 1 (the files hold one rank's KV), a storage
folder both engines can read (one machine, or a shared file system), and KV that crosses the file
system, so it is a correctness and plumbing path, not a fast one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector,
    ExampleConnectorMetadata,
)

from dynamo_sdk.llm.disagg.kv_storage import (
    PARAMS_KEY,
    is_storage_key,
    remove_stored,
    stored_tokens,
    transfer_path,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _Store:
    key: str
    token_ids: list[int]
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False


class DynamoStorageConnector(ExampleConnector):
    """ExampleConnector's per-layer files, for flagged requests only, keyed and cleaned up."""

    # ---- scheduler side -------------------------------------------------------------------

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keys: dict[str, tuple[str, str]] = {}  # request id -> ("store" | "load", key)
        self._stores: dict[str, _Store] = {}
        self._loads: dict[str, int] = {}  # request id -> tokens it loads

    def on_new_request(self, request: Request) -> None:
        params = (request.kv_transfer_params or {}).get(PARAMS_KEY)
        if not isinstance(params, dict):
            return
        for mode in ("store", "load"):
            key = params.get(mode)
            if isinstance(key, str) and key:
                if not is_storage_key(key):  # only our keys: a folder inside the storage root
                    log.warning("request %s: ignoring KV %s key %r (not a storage key)",
                                request.request_id, mode, key[:200])  # fmt: skip
                    return
                self._keys[request.request_id] = (mode, key)
                return

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        mode, key = self._keys.get(request.request_id, ("", ""))
        if mode != "load":
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        tokens = stored_tokens(len(prompt), self._block_size)
        found = _read_marker(str(transfer_path(self._storage_path, key)))
        if found != tokens:  # missing, half written, or for another prompt or block size
            log.warning("no complete stored KV for %s under %s (%s tokens, %d expected): "
                        "computing it", key, self._storage_path, found, tokens)  # fmt: skip
            return 0, False
        self._loads[request.request_id] = max(tokens - num_computed_tokens, 0)
        return self._loads[request.request_id], False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0:
            self._requests_need_load[request.request_id] = request
        else:
            self._loads.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Loads for requests scheduled with external tokens; saves for flagged requests in the
        step that completes their stored part (their KV is in the cache once it has run)."""
        meta = ExampleConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            req_id = new.req_id
            mode, key = self._keys.get(req_id, ("", ""))
            token_ids = list(new.prompt_token_ids or [])
            if req_id in self._requests_need_load:
                self._add(meta, token_ids, new.block_ids[0], key, store=False)
            elif mode == "store":
                tokens = stored_tokens(len(token_ids), self._block_size)
                store = _Store(key, token_ids, tokens, list(new.block_ids[0]))
                if tokens > 0:
                    self._stores[req_id] = store
                self._maybe_save(meta, store, new.num_computed_tokens + scheduled.get(req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            resumed = req_id in cached.resumed_req_ids
            new_blocks = cached.new_block_ids[i]
            request = self._requests_need_load.get(req_id)
            if request is not None and resumed and new_blocks is not None:
                # preempted before, and scheduled again with a fresh lookup: load again
                _, key = self._keys[req_id]
                prompt = list(request.prompt_token_ids or [])
                self._add(meta, prompt, new_blocks[0], key, store=False)
            pending = self._stores.get(req_id)
            if pending is not None and not pending.saved:
                if new_blocks is not None:
                    old = [] if resumed else pending.block_ids
                    pending.block_ids = old + list(new_blocks[0])
                done = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
                self._maybe_save(meta, pending, done)
        self._requests_need_load.clear()
        return meta

    def _maybe_save(self, meta: ExampleConnectorMetadata, store: _Store, computed: int) -> None:
        if store.num_tokens > 0 and not store.saved and computed >= store.num_tokens:
            self._add(meta, store.token_ids, store.block_ids, store.key, store=True)
            store.saved = True

    def _add(
        self,
        meta: ExampleConnectorMetadata,
        token_ids: list[int],
        block_ids: list[int],
        key: str,
        store: bool,
    ) -> None:
        # ExampleConnector's file names come from a request's token ids and "mm_hashes"; the
        # key travels as the only mm hash and `_generate_foldername_debug` turns it into the
        # folder, so the worker-side save/load code is used unchanged.
        meta.add_request(token_ids, block_ids, self._block_size, is_store=store, mm_hashes=[key])

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Report what was stored or loaded; a decode side's stored KV is deleted here (its
        load ran in an earlier step, or never will)."""
        req_id = request.request_id
        mode, key = self._keys.pop(req_id, ("", ""))
        self._requests_need_load.pop(req_id, None)
        if mode == "store":
            store = self._stores.pop(req_id, None)
            saved = store.num_tokens if store is not None and store.saved else 0
            if saved:  # the step that saved it has run: every layer's file is complete
                _write_marker(str(transfer_path(self._storage_path, key)), saved)
            return False, {PARAMS_KEY: {"stored": saved}}
        if mode == "load":
            loaded = self._loads.pop(req_id, 0)
            remove_stored(self._storage_path, key)
            return False, {PARAMS_KEY: {"loaded": loaded}}
        return False, None

    # ---- both sides -----------------------------------------------------------------------

    def _generate_foldername_debug(
        self, token_ids: Any, mm_hashes: list[str], create_folder: bool = False
    ) -> str:
        if len(mm_hashes) != 1:  # not ours: ExampleConnector's own naming (never reached)
            return str(super()._generate_foldername_debug(token_ids, mm_hashes, create_folder))
        folder = str(transfer_path(self._storage_path, mm_hashes[0]))  # a key, or it raises
        if create_folder:
            os.makedirs(folder, exist_ok=True)
        return folder


# A stored prompt's folder holds one file per layer, written while the prefill step runs, and
# this marker, written once the step has finished: the decode side loads only a folder whose
# marker names the number of tokens it expects, so a prefill that died half way (or a folder of
# another prompt or block size) is computed, never loaded into the cache.
_MARKER = "stored_tokens"


def _write_marker(folder: str, tokens: int) -> None:
    tmp = os.path.join(folder, f".{_MARKER}.tmp")
    with open(tmp, "w") as f:
        f.write(str(tokens))
    os.replace(tmp, os.path.join(folder, _MARKER))  # atomic: never seen half written


def _read_marker(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, _MARKER)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
