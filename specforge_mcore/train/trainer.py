"""The training loop: target → features → draft (TTT) → loss → gradients over the world → AdamW.

One optimizer step:

1. the global batch (``train.global_batch_size`` packed rows, in a seeded order per epoch) is split
   into ``optim.grad_accum`` rounds; each round's rows are split over the data-parallel groups of the
   target, then into micro-batches;
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

import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from specforge_mcore import collectives, platform
from specforge_mcore.config import RunConfig, config_to_dict, save_config
from specforge_mcore.errors import UserError
from specforge_mcore.precision import DtypePolicy
from specforge_mcore.train import faults

log = logging.getLogger("specforge_mcore.train")


@dataclass
class BatchPlan:
    """How a global batch of rows maps onto rounds, data-parallel groups, micro-batches and shards."""

    global_batch: int
    rounds: int  # gradient accumulation
    dp_groups: int
    micro_batch_size: int
    shards_per_group: int  # tp * pp

    @property
    def rows_per_round(self) -> int:
        return self.global_batch // self.rounds

    def check(self, where: str) -> None:
        g, a, d, m, r = self.global_batch, self.rounds, self.dp_groups, self.micro_batch_size, self.shards_per_group
        unit = a * d * (m * r // math.gcd(m, r))
        if g % unit:
            raise UserError(
                f"{where}: train.global_batch_size={g} does not split evenly: it must be a multiple of "
                f"grad_accum({a}) × data-parallel groups({d}) × lcm(target.micro_batch_size={m}, tp·pp={r}) = {unit} "
                f"(e.g. {unit * max(1, round(g / unit))})")


def resolve_target_dir(cfg: RunConfig, rank: int) -> str:
    """The target's HF directory; a random target is generated (once, by rank 0) when asked for."""
    if cfg.target.hf_dir:
        if not os.path.isdir(cfg.target.hf_dir):
            raise UserError(f"target.hf_dir {cfg.target.hf_dir} does not exist (run `make setup` for the "
                            "SmolLM2 targets, or point it at an HF model directory)")
        return cfg.target.hf_dir
    if cfg.target.random is None:
        raise UserError("set target.hf_dir (an HF model directory) or target.random (a generated test target)")
    from specforge_mcore.target.random import random_target

    path = None
    if rank == 0:
        path = random_target(cfg.target.random.family, cfg.target.random.hf_config, cfg.target.random.seed)
    return collectives.broadcast_object(path, src=0)


def check_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"output directory {out_dir} is not writable: {exc.strerror or exc}") from None


def check_fresh_start(out_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (``latest`` would pick theirs)."""
    from specforge_mcore.train.checkpoint import checkpoints_dir, list_checkpoints

    found = list_checkpoints(out_dir)
    if resume or not found:
        return
    if not overwrite:
        raise UserError(f"{out_dir} already holds checkpoints up to step_{found[-1][0]}: pass --resume to continue "
                        "that run, --overwrite to discard it, or another --out")
    import shutil

    shutil.rmtree(checkpoints_dir(out_dir))
    for name in ("metrics.jsonl", "training.png", "steps.ledger.jsonl", "best.json"):  # --overwrite: a new run's
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str, resume: bool = False, quiet: bool = False):
        from megatron.core import parallel_state as ps

        from specforge_mcore.parallel import describe_topology, init_distributed, raise_together
        from specforge_mcore.target.build import Layout, check_layout, init_model_parallel, read_hf_config
        from specforge_mcore.target.families import family_for
        from specforge_mcore.target.host import TargetHost
        from specforge_mcore.target.transport import row_shards

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
        self.host = TargetHost(self.hf_dir, self.layout, self.precision.target, tc.capture_layer_ids,
                               teacher_impl=cfg.kernels.teacher, teacher_chunk_tokens=cfg.kernels.teacher_chunk_tokens,
                               fp8=tc.fp8, quantize=tc.quantize)
        if self.is_main and not quiet and self.host.weights_note:
            print(self.host.weights_note, flush=True)
        # Before any data work: packed documents must not see each other in this target's attention path.
        from specforge_mcore.target.packing_check import check_document_isolation

        check_document_isolation(self.host)  # logs its summary; raises (on every rank) when documents leak
        self.hf = self.host.hf
        self.shards = row_shards(self.host)  # which rows of a round this rank trains on
        self._setup_data()
        self._setup_draft()
        self._setup_optimizer()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.best = self._load_best() if (resume or self.restarted) else None
        # A job restarted by torchrun (--max-restarts) continues from its latest checkpoint by itself.
        if resume or self.restarted:
            self._resume()

    # ---- setup ----------------------------------------------------------------------------------
    def _barrier(self) -> None:
        collectives.barrier()

    def _setup_data(self) -> None:
        from specforge_mcore.data.prepare import load_tokenizer, prepare_data, summary
        from specforge_mcore.data.tokenize import check_same_tokenizer, check_tokenizer_matches

        cfg = self.cfg
        # Before any data work: a tokenizer that does not fit the target is an error, not garbage features.
        tokenizer = load_tokenizer(cfg)
        check_tokenizer_matches(tokenizer, int(self.hf["vocab_size"]), f"{self.hf_dir}/config.json")
        check_same_tokenizer(tokenizer, self.hf_dir, "target.tokenizer_dir")
        if self.is_main:  # one rank builds the cache; the others read it
            train, evaluation, bad = prepare_data(cfg)
            if not self.quiet:
                print(summary(train, evaluation, bad), flush=True)
        self._barrier()
        if not self.is_main:
            train, evaluation, bad = prepare_data(cfg)
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

    def _load_or_build_vocab(self):
        from specforge_mcore.data.vocab import DraftVocab, build_draft_vocab, token_counts

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
        self._barrier()
        vocab = DraftVocab.load(path, vocab_size)
        if vocab.draft_vocab_size != cfg.draft.draft_vocab_size:
            raise UserError(f"{path} maps {vocab.draft_vocab_size} draft tokens but draft.draft_vocab_size="
                            f"{cfg.draft.draft_vocab_size}; delete it or set data.vocab_file")
        return vocab

    def _setup_draft(self) -> None:
        from specforge_mcore.draft.attention import select_attention_backend
        from specforge_mcore.draft.io import load_draft
        from specforge_mcore.draft.model import DraftArch, Eagle3Draft

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
        from specforge_mcore.train.optim import build_optimizer, build_scheduler

        self.params = [(n, p) for n, p in self.draft.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.total_steps)

    # ---- data -----------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=generator)

    def step_rows(self, step: int) -> torch.Tensor:
        """Row indices of the global batch of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        g = self.plan.global_batch
        return self.epoch_order(epoch)[index * g:(index + 1) * g]

    def _micro_batches(self, data, rows: torch.Tensor):
        from specforge_mcore.target.host import MicroBatch

        m = self.plan.micro_batch_size
        return [MicroBatch(data.input_ids[rows[i:i + m]], data.position_ids[rows[i:i + m]],
                           data.document_ids[rows[i:i + m]]) for i in range(0, len(rows), m)]

    def _phase(self, timer, name: str, train: bool):
        """The timed phase ``name``; fault injection may kill this rank as it enters (train/faults.py)."""
        if train:
            faults.in_phase(name, self.step + 1, self.rank)
        return timer(name)

    # ---- one round: target -> features -> draft -----------------------------------------------
    def _round(self, data, rows: torch.Tensor, timer, train: bool, rounds: int):
        """Run the target and the draft over one round's rows; backprop when training.
        Returns (weighted step losses [S], correct [S], valid [S], real tokens) of this rank."""
        from specforge_mcore.draft.ttt import DraftBatch, position_masks, step_weights, ttt_unroll
        from specforge_mcore.target.transport import scatter_features

        with self._phase(timer, "target_forward", train):
            captures = self.host.forward(self._micro_batches(data, self.shards.group(rows)))
        with self._phase(timer, "feature_transport", train):
            shard = scatter_features(self.host, captures, self.plan.micro_batch_size, data.max_length, self.shards)
        del captures
        mine = self.shards.mine(rows)
        dev = self.device
        batch = DraftBatch(
            input_ids=data.input_ids[mine].to(dev), position_ids=data.position_ids[mine].to(dev),
            document_ids=data.document_ids[mine].to(dev), assistant_mask=data.assistant_mask[mine].to(dev),
            aux_hidden=[self.precision.to_draft(h) for h in shard.aux_hidden],
            final_hidden=self.precision.to_draft(shard.final_hidden), target_argmax=shard.target_argmax)
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
        return out.weighted_step_losses, out.correct, out.valid, real_tokens, out.chain

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
        from specforge_mcore.train.optim import clip_, global_grad_norm

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

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Held-out loss and per-step accuracy, and the chained acceptance-length estimate
        ``eval_sim_al = 1 + sum_j prod_{i<=j} a_i`` from the per-step conditional acceptance ``eval_accept``
        (docs/design.md §10)."""
        from specforge_mcore.draft.ttt import chained_acceptance_length
        from specforge_mcore.train.phases import PhaseTimer

        data = self.eval_data
        per_round = self.plan.rows_per_round
        batches = min(self.cfg.train.eval_batches, len(data) // per_round)
        if batches == 0:
            return None
        s = self.cfg.draft.ttt_steps
        totals = [torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)]
        chain = torch.zeros(2, s, dtype=torch.float64)
        timer = PhaseTimer(self.device)
        for b in range(batches):
            rows = torch.arange(b * per_round, (b + 1) * per_round)
            w, c, v, _, ch = self._round(data, rows, timer, False, batches)
            totals[0] += w.double().cpu()
            totals[1] += c.cpu()
            totals[2] += v.cpu()
            chain += ch.double().cpu()
        m = self._reduce_metrics(*totals, 0)
        reached, accepted = collectives.all_reduce(chain).tolist()
        rates, length = chained_acceptance_length(reached, accepted)
        return {"eval_loss": m["loss"], "eval_loss_steps": m["loss_steps"], "eval_acc": m["acc"],
                "eval_accept": rates, "eval_sim_al": length}

    # ---- the best checkpoint by the held-out acceptance-length estimate ------------------------
    BEST = "best.json"

    def _load_best(self) -> Optional[dict]:
        path = os.path.join(self.out_dir, self.BEST)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fh:
            best = json.load(fh)
        return best if os.path.isdir(best.get("checkpoint", "")) else None

    def _is_new_best(self, record: dict) -> bool:
        value = record.get("eval_sim_al")
        return value is not None and (self.best is None or value > self.best["eval_sim_al"])

    def _record_best(self, record: dict, checkpoint: str) -> None:
        """``OUT/best.json`` names the checkpoint with the highest held-out estimate; rotation keeps it."""
        self.best = {"step": record["step"], "eval_sim_al": record["eval_sim_al"],
                     "eval_accept": record["eval_accept"], "checkpoint": checkpoint}
        if self.is_main:
            tmp = os.path.join(self.out_dir, f".{self.BEST}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.best, fh, indent=1)
            os.replace(tmp, os.path.join(self.out_dir, self.BEST))
            if not self.quiet:
                print(f"best so far: held-out acceptance-length estimate {record['eval_sim_al']:.3f} at step "
                      f"{record['step']} -> {checkpoint}", flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "rows_consumed": self.step * self.plan.global_batch,
            "next_rows": self.step_rows(self.step)[:8].tolist() if self.step < self.total_steps else [],
            "world_size": self.world,
            "layout": str(self.layout),
            "global_batch_size": self.plan.global_batch,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "target": target_identity(self.hf, self.hf_dir),
        }

    def save(self) -> str:
        from specforge_mcore.data.vocab import DraftVocab
        from specforge_mcore.draft.io import save_draft
        from specforge_mcore.fileio import save_torch
        from specforge_mcore.train.checkpoint import save_checkpoint

        def write(directory: str) -> None:
            save_draft(self.draft, directory)
            DraftVocab(self.draft.d2t.cpu(), self.draft.t2d.cpu()).save(os.path.join(directory, "vocab.safetensors"))
            save_torch({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, "optimizer.pt"))
            cfg = dict(config_to_dict(self.cfg))
            cfg["target"] = dict(cfg["target"], hf_dir=self.hf_dir)
            from specforge_mcore.config import config_from_dict

            save_config(config_from_dict(cfg), os.path.join(directory, "config.yaml"))

        from specforge_mcore.train.checkpoint import CheckpointWriteError, latest_checkpoint

        try:
            return save_checkpoint(self.out_dir, self.step, write, self.trainer_state(), self.cfg.train.keep_checkpoints,
                                   protect=(self.best or {}).get("checkpoint"))
        except CheckpointWriteError as exc:
            last = latest_checkpoint(self.out_dir)
            raise CheckpointWriteError(f"{exc}; training stopped at step {self.step}. Last good checkpoint: "
                                       f"{last or 'none'} (resume with --resume once the disk has room)") from None

    def _resume(self) -> None:
        from safetensors.torch import load_file

        from specforge_mcore.parallel import raise_together
        from specforge_mcore.train.checkpoint import (latest_checkpoint, load_plain, load_rng, read_trainer_state,
                                                      set_rng_state, verify_checkpoint)

        path = latest_checkpoint(self.out_dir)
        if path is None:
            if self.is_main and not self.quiet:
                print(f"resume: no complete checkpoint under {self.out_dir}/checkpoints; starting fresh", flush=True)
            return
        error = None
        if self.is_main:  # one rank reads every byte against the manifest, not every rank
            try:
                verify_checkpoint(path)
            except UserError as exc:
                error = exc
        raise_together(error)
        state = read_trainer_state(path)
        check_target_identity(state.get("target", {}), self.hf, path)
        if state["global_batch_size"] != self.plan.global_batch:
            raise UserError(f"{path} was trained with global_batch_size={state['global_batch_size']}; resuming with "
                            f"{self.plan.global_batch} would change the data order. Use the same global batch.")
        weights = load_file(os.path.join(path, "draft.safetensors"))
        expected = self.draft.trainable_state_dict()
        for key, tensor in weights.items():
            if key not in expected or tuple(tensor.shape) != tuple(expected[key].shape):
                raise UserError(f"{path}/draft.safetensors: {key} {list(tensor.shape)} does not fit this draft "
                                f"({list(expected[key].shape) if key in expected else 'no such parameter'})")
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise UserError(f"{path}/draft.safetensors lacks {', '.join(missing[:5])}"
                            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: an incomplete or "
                            "foreign checkpoint; resume from another one")
        # strict=False only because the frozen target embedding (a non-persistent buffer) is never saved.
        self.draft.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=False)
        opt = load_plain(os.path.join(path, "optimizer.pt"), map_location=self.device)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step = int(state["step"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        if self.is_main:
            truncate_metrics(os.path.join(self.out_dir, "metrics.jsonl"), self.step)
        rng = load_rng(path, self.rank)
        if rng is not None:
            set_rng_state(rng)
        if self.is_main and not self.quiet:
            note = "" if state["world_size"] == self.world else \
                f" (saved at world size {state['world_size']}, now {self.world}: the replicated draft and optimizer need no resharding)"
            print(f"resumed from {path} at step {self.step}{note}", flush=True)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from tqdm import tqdm

        from specforge_mcore.train.metrics import MetricsWriter, append_to_ledger, plot_metrics
        from specforge_mcore.train.phases import PhaseTimer
        from specforge_mcore.train.profile import StepProfiler

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
            seconds = time.perf_counter() - start
            phases = timer.take()
            profiler.end(self.step, phases, seconds)
            record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **metrics,
                      "tokens_per_s": metrics["tokens"] / seconds, "step_seconds": seconds,
                      "phases": phases, "peak_memory_bytes": peak_memory_bytes(self.device)}
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                record.update(self.evaluate() or {})
                if self._is_new_best(record):
                    last_saved = self.save()
                    self._record_best(record, last_saved)
            history.append(record)
            if self.is_main:
                append_to_ledger(self.out_dir, self.step, metrics["rows"], self.attempt)
            if self.is_main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                writer.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc0=f"{record['acc'][0]:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and not (last_saved or "").endswith(f"step_{self.step}"):
                last_saved = self.save()
            if terminate.agreed():
                break
        bar.close()
        profiler.close()
        terminate.restore()
        if self.step < self.total_steps:  # exit_after_step or SIGTERM: checkpoint and leave; --resume continues
            if last_saved is None or not last_saved.endswith(f"step_{self.step}"):
                last_saved = self.save()
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
            last_saved = self.save()
        if final_eval and self._is_new_best(final_eval):
            self._record_best({"step": self.step, **final_eval}, last_saved)
        if self.is_main:
            writer.close()
            if cfg.plot and history:
                plot_metrics(os.path.join(self.out_dir, "metrics.jsonl"), os.path.join(self.out_dir, "training.png"),
                             title=f"{self.cfg.name}: {self.hf_dir}")
        return history


def truncate_metrics(path: str, step: int) -> None:
    """Drop logged steps after ``step``: they are redone after a resume, and each step is logged once."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


class TerminationRequest:
    """SIGTERM/SIGUSR1 caught during training: the step in flight finishes, every rank agrees at the step
    boundary (one all-reduce; a signal may reach the ranks at different steps), the run checkpoints and
    returns cleanly. A second signal ends the process at once (a launcher tearing down a failed job sends
    SIGTERM to ranks that may be stuck in a collective). Handlers are installed only in the main thread and
    restored afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal (an impatient launcher): die now, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def agreed(self) -> bool:
        flag = collectives.all_reduce(torch.tensor([0 if self.signum is None else self.signum]), op="max")
        if int(flag) and self.signum is None:
            self.signum = int(flag)
        return bool(int(flag))

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


def target_identity(hf: dict, hf_dir: str) -> dict:
    return {"hf_dir": hf_dir, "architectures": hf.get("architectures"), "hidden_size": hf["hidden_size"],
            "vocab_size": hf["vocab_size"], "num_hidden_layers": hf["num_hidden_layers"]}


def check_target_identity(saved: dict, hf: dict, where: str) -> None:
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if key in saved and saved[key] != hf[key]:
            raise UserError(f"{where} was trained against a target with {key}={saved[key]}, but this target has "
                            f"{key}={hf[key]} ({saved.get('hf_dir')} vs now): a draft only fits the target it was made for")


def check_draft_fits_target(arch, hf: dict, capture_layer_ids: list[int], where: str) -> None:
    if arch.target_hidden_size != hf["hidden_size"]:
        raise UserError(f"{where}: the draft reads target hidden states of size {arch.target_hidden_size}, this "
                        f"target's hidden_size is {hf['hidden_size']}")
    if arch.vocab_size != hf["vocab_size"]:
        raise UserError(f"{where}: the draft maps a vocabulary of {arch.vocab_size} tokens, this target has "
                        f"vocab_size={hf['vocab_size']}")
    if list(arch.capture_layer_ids) != list(capture_layer_ids):
        raise UserError(f"{where}: the draft was trained on target layers {arch.capture_layer_ids}, the run "
                        f"captures {capture_layer_ids}; set target.capture_layer_ids={arch.capture_layer_ids}")
