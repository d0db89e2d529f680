"""The training loop: target → features → draft (TTT) → loss → gradients over the world → AdamW.

One optimizer step:

1. the global batch (``train.global_batch_size`` packed rows, in a seeded order per epoch) is split
   into ``optim.grad_accum`` rounds; each round's rows are split over the data-parallel groups of the
   target, then into micro-batches (``train/batching.py``; which rows each rank trains on:
   ``specforge_mcore/rows.py``);
2. each model-parallel group runs the frozen target through Megatron's pipeline schedule
   (``target_forward``) and scatters the captured features so every rank holds its own shard
   (``feature_transport``);
3. every rank unrolls the draft over its shard (``draft_forward``) and back-propagates
   (``draft_backward``); losses are normalised by the number of valid positions of each TTT step over
   the whole world (each round on its own, the rounds then averaged), so the gradient is a plain sum;
4. gradients are all-reduced (sum) over the world (``grad_reduce``), clipped by their global norm, and
   AdamW steps (``optimizer``). A non-finite loss or gradient skips the step; N in a row abort.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from specforge_mcore import collectives, platform
from specforge_mcore.config import RunConfig, save_config
from specforge_mcore.data.prepare import cache_key, load_tokenizer, prepare_data, summary
from specforge_mcore.data.tokenize import check_same_tokenizer, check_tokenizer_matches
from specforge_mcore.data.vocab import DraftVocab, build_draft_vocab, token_counts
from specforge_mcore.draft.attention import select_attention_backend
from specforge_mcore.draft.io import load_draft
from specforge_mcore.draft.model import DraftArch, Eagle3Draft
from specforge_mcore.draft.ttt import DraftBatch, chained_acceptance_length, position_masks, step_weights, ttt_unroll
from specforge_mcore.errors import UserError
from specforge_mcore.features.cache import FeatureCache, stores_cover_run
from specforge_mcore.features.store import store_identity
from specforge_mcore.parallel import describe_topology, init_distributed, raise_together
from specforge_mcore.precision import DtypePolicy
from specforge_mcore.target.build import Layout, check_layout, init_model_parallel, read_hf_config
from specforge_mcore.target.families import family_for
from specforge_mcore.target.host import StoredTarget, TargetHost
from specforge_mcore.target.packing_check import check_document_isolation
from specforge_mcore.target.transport import row_shards, scatter_features
from specforge_mcore.train import faults, state
from specforge_mcore.train.batching import BatchPlan, micro_batches, step_rows
from specforge_mcore.train.compat import (check_draft_fits_target, check_fresh_start, check_writable, resolve_target_dir,
                                          target_identity)
from specforge_mcore.train.metrics import MetricsWriter, append_to_ledger, plot_metrics
from specforge_mcore.train.optim import build_optimizer, build_scheduler, clip_, global_grad_norm
from specforge_mcore.train.phases import PhaseTimer
from specforge_mcore.train.profile import StepProfiler
from specforge_mcore.train.signals import TerminationRequest


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str, resume: bool = False, quiet: bool = False):
        # Imported here, not at the top: 3.4 s, and train/plan.py imports BatchPlan through this module.
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.out_dir = out_dir
        self.quiet = quiet
        self.launch = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = platform.device()
        self.is_main = self.rank == 0
        self.restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        # Which attempt of the job this is, for the step ledger: torchrun's restart count, or the time of
        # this start (Slurm requeues and reruns with --resume are new processes).
        self.attempt = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}@{int(time.time())}"
        error = None
        if self.is_main:
            try:
                check_writable(out_dir)
                check_fresh_start(out_dir, resume or self.restarted, cfg.train.overwrite)
            except UserError as exc:
                error = exc
        raise_together(error)

        tc = cfg.target
        self.layout = Layout(tp=tc.tp, pp=tc.pp, ep=tc.ep, etp=tc.etp, sp=tc.sp, dispatcher=tc.moe_token_dispatcher)
        self.hf_dir = resolve_target_dir(cfg, self.rank)
        hf = read_hf_config(self.hf_dir)
        check_layout(hf, family_for(hf), self.layout, self.world, f"{self.hf_dir}/config.json")
        init_model_parallel(self.layout, seed=cfg.train.seed)
        self.plan = BatchPlan(cfg.train.global_batch_size, cfg.optim.grad_accum, ps.get_data_parallel_world_size(),
                              tc.micro_batch_size, tc.tp * tc.pp)
        self.plan.check("config")
        topology = describe_topology(self.layout, self.world, self.launch)
        if self.is_main and not quiet:
            print(topology, flush=True)

        self.precision = DtypePolicy.resolve(tc.dtype, cfg.draft.dtype, self.device)
        if self.is_main and not quiet:
            print(self.precision.describe(), flush=True)
        self.hf = hf
        self._setup_data()
        self.host = self._setup_target()
        self.shards = row_shards(self.host)  # which rows of a round this rank trains on
        self.spec_probe = self._setup_spec_probe()
        self.features = self._setup_features()
        self._setup_draft()
        self._setup_optimizer()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.best = state.BestCheckpoint(out_dir, self.is_main, quiet, resuming=resume or self.restarted)
        # A job restarted by torchrun (--max-restarts) continues from its latest checkpoint by itself.
        if resume or self.restarted:
            state.resume(self)

    # ---- setup ----------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        # Before any data work: a tokenizer that does not fit the target is an error, not garbage features.
        tokenizer = load_tokenizer(cfg)
        check_tokenizer_matches(tokenizer, int(self.hf["vocab_size"]), f"{self.hf_dir}/config.json")
        check_same_tokenizer(tokenizer, self.hf_dir, "target.tokenizer_dir")
        if self.is_main:  # one rank builds the cache; the others read it
            train, evaluation, bad = prepare_data(cfg)
            if not self.quiet:
                print(summary(train, evaluation, bad), flush=True)
        collectives.barrier()
        if not self.is_main:
            train, evaluation, bad = prepare_data(cfg)
        self.data_key, data_identity = cache_key(cfg, tokenizer)
        self.tokenizer_identity = data_identity["tokenizer"]
        if len(train) < self.plan.global_batch:
            raise UserError(f"the training data has {len(train)} packed rows, fewer than one global batch "
                            f"(train.global_batch_size={self.plan.global_batch})")
        self.train_data, self.eval_data = train, evaluation
        wants_eval = cfg.train.eval_every or cfg.train.max_steps == 0
        if wants_eval and len(evaluation) < self.plan.global_batch and self.is_main and not self.quiet:
            print(f"note: the held-out split has {len(evaluation)} packed rows, fewer than one global batch "
                  f"({self.plan.global_batch}): no held-out evaluation (raise data.eval_fraction or add "
                  "data.eval_files)", flush=True)
        self.steps_per_epoch = len(train) // self.plan.global_batch
        total = math.ceil(cfg.train.epochs * self.steps_per_epoch)
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps is not None else max(1, total)

    def _setup_target(self):
        """The Megatron target, or, when complete feature stores hold every row this run reads, only what the
        draft needs of it (``StoredTarget``: no model built, no target memory)."""
        cfg, tc = self.cfg, self.cfg.target
        flag = torch.tensor([0])
        if self.is_main and cfg.data.features:  # rank 0 looks, every rank follows
            flag[0] = int(stores_cover_run(cfg.data.features, len(self.train_data), self.heldout_rows_read()))
        collectives.broadcast(flag, src=0)
        if int(flag):
            if self.is_main and not self.quiet:
                print(f"every training row and the {self.heldout_rows_read()} held-out rows evaluation reads are in "
                      f"the feature store {cfg.data.features}: the target is not loaded (its embedding and the output "
                      "rows of the draft vocabulary are read from the checkpoint)", flush=True)
            return StoredTarget(self.hf_dir, self.layout, self.precision.target, tc.capture_layer_ids)
        host = TargetHost(self.hf_dir, self.layout, self.precision.target, tc.capture_layer_ids,
                          teacher_impl=cfg.kernels.teacher, teacher_chunk_tokens=cfg.kernels.teacher_chunk_tokens,
                          fp8=tc.fp8, quantize=tc.quantize)
        if self.is_main and not self.quiet and host.weights_note:
            print(host.weights_note, flush=True)
        # Before any training: packed documents must not see each other in this target's attention path.
        check_document_isolation(host)  # logs its summary; raises (on every rank) when documents leak
        return host

    def _setup_spec_probe(self):
        """``train.eval_spec_prompts``: real speculative decoding at each evaluation (rank 0; spec_eval.py)."""
        cfg = self.cfg.train
        if not cfg.eval_spec_prompts:
            return None
        from specforge_mcore.train.spec_eval import SpecProbe

        probe, error = None, None
        if self.is_main:
            try:
                probe = SpecProbe(self.hf_dir, self.eval_data, self.host.capture_layer_ids, cfg.eval_spec_prompts,
                                  cfg.eval_spec_max_new_tokens, self.cfg.draft.ttt_steps)
            except UserError as exc:  # every rank stops, not only rank 0
                error = exc
        raise_together(error)
        return probe

    def _setup_features(self) -> Optional[FeatureCache]:
        """``data.features``: the offline feature store of the training rows (features/cache.py)."""
        cfg = self.cfg
        if not cfg.data.features:
            if cfg.train.cache_features and self.is_main and not self.quiet:
                print("note: train.cache_features=true without data.features: no feature store, every epoch runs "
                      "the target (set data.features=DIR to cache)", flush=True)
            return None
        # The target's features depend on its weights and the dtype it computes in, not on where it lives.
        target = {k: v for k, v in target_identity(self.hf, self.hf_dir).items() if k != "hf_dir"}
        target["dtype"] = str(self.precision.target).removeprefix("torch.")
        identity = store_identity(int(self.hf["hidden_size"]), len(self.host.capture_layer_ids),
                                  cfg.data.features_dtype, cfg.data.max_length, target, self.host.capture_layer_ids,
                                  self.tokenizer_identity, {"cache_key": self.data_key})
        return FeatureCache(cfg.data.features, identity, self.rank, self.is_main, cfg.train.cache_features, self.quiet)

    def _load_or_build_vocab(self):
        cfg = self.cfg
        vocab_size = int(self.hf["vocab_size"])
        if cfg.draft.init_from:
            return None  # the fine-tuned draft keeps its own mapping
        if cfg.data.vocab_file:
            return DraftVocab.load(cfg.data.vocab_file, vocab_size)
        path = os.path.join(self.out_dir, "vocab.safetensors")
        if self.is_main and not os.path.isfile(path):
            assistant, everything = token_counts(self.train_data, vocab_size)
            vocab = build_draft_vocab((assistant, everything), vocab_size, cfg.draft.draft_vocab_size)
            vocab.save(path, metadata={"coverage": f"{vocab.coverage(assistant):.6f}"})
        collectives.barrier()
        vocab = DraftVocab.load(path, vocab_size)
        if vocab.draft_vocab_size != cfg.draft.draft_vocab_size:
            raise UserError(f"{path} maps {vocab.draft_vocab_size} draft tokens but draft.draft_vocab_size="
                            f"{cfg.draft.draft_vocab_size}; delete it or set data.vocab_file")
        return vocab

    def _setup_draft(self) -> None:
        cfg = self.cfg
        vocab = self._load_or_build_vocab()
        torch.manual_seed(cfg.train.seed)
        if cfg.draft.init_from:
            draft = load_draft(cfg.draft.init_from)
            check_draft_fits_target(draft.arch, self.hf, self.host.capture_layer_ids, cfg.draft.init_from)
        else:
            arch = DraftArch.from_target(self.hf, cfg.draft, self.host.capture_layer_ids, cfg.draft.draft_vocab_size)
            arch.torch_dtype = str(self.precision.draft_compute).removeprefix("torch.")
            draft = Eagle3Draft(arch)
            draft.set_vocab(vocab.d2t, vocab.t2d)
        # The draft shares the target's token embedding; the teacher needs the target's output rows of
        # the draft vocabulary. The host provides both; they are cast once, to the draft's compute dtype
        # (the dtype policy's boundary), below.
        embedding, self.teacher_weight = self.host.draft_inputs(draft.d2t + torch.arange(draft.arch.draft_vocab_size))
        if cfg.draft.init_from is None:
            # Start the draft head at the target's rows for the draft vocabulary: the draft's final hidden
            # imitates the target's, so these are good logits from step 0.
            with torch.no_grad():
                draft.lm_head.weight.copy_(self.teacher_weight)
        draft.set_embedding(self.precision.to_draft(embedding))
        self.draft = draft.to(self.device)
        self.teacher_weight = self.precision.to_draft(self.teacher_weight).to(self.device)
        self.draft.embed_tokens = self.draft.embed_tokens.to(self.device)
        with torch.no_grad():  # identical start on every rank, whatever their RNG did
            for tensor in list(self.draft.parameters()) + [self.draft.d2t, self.draft.t2d]:
                collectives.broadcast(tensor.data, src=0)
        self.attention = select_attention_backend(cfg.draft.attention_backend, self.device)
        self.t2d = self.draft.t2d

    def _setup_optimizer(self) -> None:
        self.params = [(n, p) for n, p in self.draft.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.total_steps)

    # ---- data -----------------------------------------------------------------------------------
    def step_rows(self, step: int) -> torch.Tensor:
        """Row indices of the global batch of optimizer step ``step`` (0-based)."""
        return step_rows(len(self.train_data), self.plan.global_batch, self.cfg.train.seed, step)

    def _phase(self, timer, name: str, train: bool):
        """The timed phase ``name``; fault injection may kill this rank as it enters (train/faults.py)."""
        if train:
            faults.in_phase(name, self.step + 1, self.rank)
        return timer(name)

    # ---- one round: target -> features -> draft -----------------------------------------------
    def _round(self, data, rows: torch.Tensor, timer, train: bool, rounds: int):
        """Run the target and the draft over one round's rows; backprop when training.
        Returns (weighted step losses [S], correct [S], valid [S], real tokens, and when not training the
        draft chains' counts [2, S] and the decoding walk [2], ``ttt_unroll``'s) of this rank."""
        mine = self.shards.mine(rows)
        dev = self.device
        split = data is self.train_data  # the training rows' store, or the held-out rows'
        if self.features is not None and self.features.covers(rows, split):
            with timer("feature_read"):  # the offline feature store has this round's rows: no target forward
                aux, final, argmax = self.features.read(mine, split)
                aux, final, argmax = [a.to(dev) for a in aux], final.to(dev), argmax.to(dev)
        else:
            with self._phase(timer, "target_forward", train):
                captures = self.host.forward(micro_batches(data, self.shards.group(rows), self.plan.micro_batch_size))
            with self._phase(timer, "feature_transport", train):
                shard = scatter_features(self.host, captures, self.plan.micro_batch_size, data.max_length, self.shards)
            del captures
            aux, final, argmax = shard.aux_hidden, shard.final_hidden, shard.target_argmax
            if self.features is not None:
                self.features.write(mine, aux, final, argmax, train=split)
        batch = DraftBatch(
            input_ids=data.input_ids[mine].to(dev), position_ids=data.position_ids[mine].to(dev),
            document_ids=data.document_ids[mine].to(dev), assistant_mask=data.assistant_mask[mine].to(dev),
            aux_hidden=[self.precision.to_draft(h) for h in aux],
            final_hidden=self.precision.to_draft(final), target_argmax=argmax)
        steps = self.cfg.draft.ttt_steps
        masks = position_masks(batch, self.t2d, steps)
        valid = torch.stack([m.sum() for m in masks]).to(torch.float64)
        collectives.all_reduce(valid)
        weights = [w / rounds for w in step_weights(valid, self.cfg.draft.ttt_decay)]
        kernels = self.cfg.kernels
        with timer("draft_forward"), self.precision.draft_autocast(dev), torch.set_grad_enabled(train):
            out = ttt_unroll(self.draft, batch, masks, weights, self.attention, self.teacher_weight,
                             loss_impl=kernels.loss, projection_impl=kernels.projection,
                             loss_chunk_tokens=kernels.loss_chunk_tokens, chain_stats=not train,
                             objective=self.cfg.draft.objective)
        if train:
            if faults.poison_loss(self.step + 1, self.rank):
                out.loss = out.loss * float("nan")
                out.weighted_step_losses = out.weighted_step_losses * float("nan")
            with self._phase(timer, "draft_backward", train):
                out.loss.backward()
        real_tokens = int(data.row_lengths[mine].sum())
        chain = None if train else (out.chain, out.walk)
        return out.weighted_step_losses, out.correct, out.valid, real_tokens, chain

    def _reduce_metrics(self, weighted: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor,
                        tokens: int) -> dict:
        stats = torch.cat([weighted.double().cpu(), correct.double().cpu(), valid.double().cpu(),
                           torch.tensor([float(tokens)], dtype=torch.float64)])
        collectives.all_reduce(stats)
        s = self.cfg.draft.ttt_steps
        decay = self.cfg.draft.ttt_decay
        w, c, v, t = stats[:s], stats[s:2 * s], stats[2 * s:3 * s], stats[3 * s]
        step_losses = [float(w[i]) / decay ** i for i in range(s)]
        return {"loss": float(w.sum()), "loss_steps": step_losses,
                "acc": [float(c[i] / v[i]) if v[i] > 0 else 0.0 for i in range(s)],
                "valid": [int(x) for x in v], "tokens": int(t)}

    # ---- optimizer step ------------------------------------------------------------------------
    def train_step(self, timer) -> dict:
        rows = self.step_rows(self.step)
        rounds = self.plan.rounds
        per_round = self.plan.rows_per_round
        s = self.cfg.draft.ttt_steps
        totals = [torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)]
        tokens = 0
        self.optimizer.zero_grad(set_to_none=True)
        for r in range(rounds):
            w, c, v, t, _ = self._round(self.train_data, rows[r * per_round:(r + 1) * per_round], timer, True, rounds)
            totals[0] += w.double().cpu()
            totals[1] += c.cpu()
            totals[2] += v.cpu()
            tokens += t
        params = [p for _, p in self.params]
        # Which ranks produced a non-finite loss or gradient (before the all-reduce spreads it).
        local_bad = not bool(torch.isfinite(totals[0]).all()) or any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
        bad_ranks = torch.zeros(self.world)
        bad_ranks[self.rank] = float(local_bad)
        collectives.all_reduce(bad_ranks)
        with self._phase(timer, "grad_reduce", True):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            collectives.all_reduce(flat)
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g
        metrics = self._reduce_metrics(*totals, tokens)
        with timer("optimizer"):
            norm = global_grad_norm(params)
            finite = math.isfinite(metrics["loss"]) and bool(torch.isfinite(norm)) and not bool(bad_ranks.any())
            metrics.update(grad_norm=float(norm), lr=self.scheduler.get_last_lr()[0], skipped=not finite,
                           rows=rows.tolist())
            if finite:
                clip_(params, norm, self.cfg.optim.clip_grad)
                self.optimizer.step()
                self.nonfinite_in_a_row = 0
            else:
                self.nonfinite_in_a_row += 1
                culprits = [r for r in range(self.world) if bad_ranks[r] > 0]
                if self.is_main:
                    print(f"step {self.step + 1}: non-finite loss or gradient on rank(s) {culprits} "
                          f"(loss={metrics['loss']}, grad norm={float(norm)}; global batch rows {rows.tolist()}): "
                          f"step skipped, {self.nonfinite_in_a_row} in a row", file=sys.stderr, flush=True)
                if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or "
                                         f"gradient (last at step {self.step}); stopping "
                                         f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps})")
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        faults.after_step(self.step, self.rank)
        return metrics

    def heldout_rows_read(self) -> int:
        """How many held-out rows each evaluation reads (rows ``0..n-1``: whole rounds, at most
        ``train.eval_batches``)."""
        per_round = self.plan.rows_per_round
        return min(self.cfg.train.eval_batches, len(self.eval_data) // per_round) * per_round

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Held-out loss and per-step accuracy, the per-step conditional acceptance ``eval_accept``, and two
        acceptance-length estimates (docs/design.md §10): ``eval_sim_al``, greedy decoding replayed on the
        teacher-forced chains (tokens per verification), and ``eval_chain_al = 1 + sum_j prod_{i<=j} a_i``."""
        data = self.eval_data
        per_round = self.plan.rows_per_round
        batches = self.heldout_rows_read() // per_round
        if batches == 0:
            return None
        s = self.cfg.draft.ttt_steps
        totals = [torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)]
        chain = torch.zeros(2, s, dtype=torch.float64)
        walk = torch.zeros(2, dtype=torch.float64)
        timer = PhaseTimer(self.device)
        for b in range(batches):
            rows = torch.arange(b * per_round, (b + 1) * per_round)
            w, c, v, _, (ch, wk) = self._round(data, rows, timer, False, batches)
            totals[0] += w.double().cpu()
            totals[1] += c.cpu()
            totals[2] += v.cpu()
            chain += ch.double().cpu()
            walk += wk.double().cpu()
        if self.features is not None:  # a run that caches: the first evaluation completes the held-out store
            self.features.end_of_evaluation(set(range(batches * per_round)))
        m = self._reduce_metrics(*totals, 0)
        reached, accepted = collectives.all_reduce(chain).tolist()
        rates, length = chained_acceptance_length(reached, accepted)
        tokens, verifications = collectives.all_reduce(walk).tolist()
        out = {"eval_loss": m["loss"], "eval_loss_steps": m["loss_steps"], "eval_acc": m["acc"],
               "eval_accept": rates, "eval_sim_al": tokens / verifications if verifications else 1.0,
               "eval_chain_al": length}
        if self.spec_probe is not None:
            out.update(self.spec_probe.measure(self.draft))
        return out

    # ---- the loop ------------------------------------------------------------------------------
    def dump_features(self) -> dict:
        """``specforge-mcore dump-features``: run the target over every training row and every held-out row and
        write their features to ``data.features`` (and its ``heldout/``), without training a draft, so that
        training from it need not load the target. Rounds already stored are skipped (a rerun after a crash
        continues). Returns the stores' summary."""
        if self.features is None:
            return {"rows": 0, "heldout_rows": 0, "already_complete": True}
        start = time.perf_counter()
        already = self.features.writer is None and self.features.heldout_writer is None
        for train in (True, False):
            self._dump_split(train)
        reader, heldout = self.features.reader, self.features.heldout_reader
        return {"rows": len(reader) if reader is not None else 0,
                "heldout_rows": len(heldout) if heldout is not None else 0,
                "seconds": time.perf_counter() - start, "already_complete": already}

    def _dump_split(self, train: bool, progress: bool = True) -> None:
        """Run the target over the rows of a split that its store lacks, then finish the store."""
        features = self.features
        writer = features.writer if train else features.heldout_writer
        if writer is None:
            return
        data = self.train_data if train else self.eval_data
        per_round, n = self.plan.rows_per_round, len(data)
        order = torch.arange(n)
        # Whole rounds in row order; a last, overlapping round takes the remainder (stored rows are skipped).
        # A held-out split smaller than a round is never evaluated: its store is empty.
        rounds = [order[i:i + per_round] for i in range(0, n - per_round + 1, per_round)]
        rounds += [order[n - per_round:]] if n % per_round and n >= per_round else []
        bar = tqdm(total=len(rounds), desc=f"dump-features ({'train' if train else 'held-out'})", unit="round",
                   disable=not self.is_main or self.quiet or not progress, dynamic_ncols=True)
        start, written = time.perf_counter(), 0
        with torch.no_grad():
            for number, rows in enumerate(rounds):
                # The last round may overlap rows another rank stored: skip those too.
                skip = features.stored_by_all(train) if number == len(rounds) - 1 and n % per_round else frozenset()
                done = writer.done | skip
                # Every rank decides from the whole round (rows other ranks wrote are in their ledgers).
                flag = torch.tensor([0 if all(r in done for r in self.shards.mine(rows).tolist()) else 1])
                collectives.all_reduce(flag)
                if int(flag):
                    captures = self.host.forward(micro_batches(data, self.shards.group(rows), self.plan.micro_batch_size))
                    shard = scatter_features(self.host, captures, self.plan.micro_batch_size, data.max_length,
                                             self.shards)
                    features.write(self.shards.mine(rows), shard.aux_hidden, shard.final_hidden, shard.target_argmax,
                                   skip, train=train)
                    written += len(rows) * data.max_length * writer.bytes_per_token
                bar.update(1)
                bar.set_postfix(MiB_s=f"{written / 2**20 / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
        bar.close()
        rows = set(range(n)) if rounds else set()
        if train:
            features.end_of_epoch(rows)
        else:
            features.end_of_evaluation(rows)

    def fit(self) -> list[dict]:
        cfg = self.cfg.train
        profiler = StepProfiler.for_trainer(self)  # inert unless train.profile
        writer = MetricsWriter(self.out_dir, cfg.tensorboard, append=self.step > 0) if self.is_main else None
        if self.is_main:
            save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))
        timer = PhaseTimer(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.is_main or self.quiet,
                   dynamic_ncols=True)
        history = []
        last_saved = None
        stop_at = min(self.total_steps, cfg.exit_after_step or self.total_steps)
        terminate = TerminationRequest()  # SIGTERM (Slurm before a time limit, preemption): save and leave
        while self.step < stop_at:
            profiler.begin(self.step)
            start = time.perf_counter()
            metrics = self.train_step(timer)
            if self.features is not None and self.step == self.steps_per_epoch and self.features.writer is not None:
                # The epoch's whole batches leave up to a batch of rows out (and a resume skips the steps before
                # it): run the target over those too, so that later epochs and later runs never need it.
                with timer("store_completion"):
                    self._dump_split(True, progress=False)
            seconds = time.perf_counter() - start
            phases = timer.take()
            profiler.end(self.step, phases, seconds)
            record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **metrics,
                      "tokens_per_s": metrics["tokens"] / seconds, "step_seconds": seconds,
                      "phases": phases, "peak_memory_bytes": peak_memory_bytes(self.device)}
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                record.update(self.evaluate() or {})
                if self.best.improved_by(record):
                    last_saved = state.save(self)
                    self.best.record(record, last_saved)
            history.append(record)
            if self.is_main:
                append_to_ledger(self.out_dir, self.step, metrics["rows"], self.attempt)
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                writer.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record['acc'][0]:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and not (last_saved or "").endswith(f"step_{self.step}"):
                last_saved = state.save(self)
            if terminate.agreed():
                break
        bar.close()
        profiler.close()
        terminate.restore()
        if self.step < self.total_steps:  # exit_after_step or SIGTERM: checkpoint and leave; --resume continues
            if last_saved is None or not last_saved.endswith(f"step_{self.step}"):
                last_saved = state.save(self)
            if self.is_main:
                writer.close()
                if terminate.signum is not None:
                    print(f"received {signal.Signals(terminate.signum).name}: stopped after step {self.step} of "
                          f"{self.total_steps}, checkpoint {last_saved}; continue with --resume", flush=True)
            return history
        final_eval = self.evaluate()
        if final_eval and self.is_main:
            writer.write({"step": self.step, **final_eval})
            history.append({"step": self.step, **final_eval})
        if last_saved is None or not last_saved.endswith(f"step_{self.step}"):
            last_saved = state.save(self)
        if final_eval and self.best.improved_by(final_eval):
            self.best.record({"step": self.step, **final_eval}, last_saved)
        if self.is_main:
            writer.close()
            if cfg.plot and history:
                plot_metrics(os.path.join(self.out_dir, "metrics.jsonl"), os.path.join(self.out_dir, "training.png"),
                             title=f"{self.cfg.name}: {self.hf_dir}")
        return history


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""
