"""Growing a bank with the line (issue 27): new good parts folded into an existing bank without the lot stage.

The new images are scored against the bank as any new part is. Those that look like the lot's ordinary good parts
(a score at most the lot's ``ACCEPT_QUANTILE`` reference score: well inside the good parts, where a defect the
decision misses rarely lies, and inside the bank's out-of-distribution thresholds) join the bank: their per-image coresets are appended to the full bank, and their image embeddings and map scores
join the re-scoring reference. The normal bank stays as built: a larger one lowers every image's normal-bank
distance, so less is subtracted and every part scores higher than the scores the threshold is read from (those were
made against the bank before it grew): with the map's mean as the image score, a grown normal bank called a third of
new good parts anomalous at a 1% budget. The calibration is read again from the lot's reference
scores and every new image's score but those out of distribution (suspected defects left out by the method, as in a
build), each part once: the
manifest keeps the keys of the parts left out (``left_out_keys``), and a part sent again, or twice in one update,
is neither scored again nor counted again (a defect sent over and over would otherwise lift the acceptance level
with its own scores until it was folded in); the
out-of-distribution calibration from the lot's statistics and those of the images folded in (they are the lot
now). What the lot stage measured once (tau_b, the heat maps' colour scale) is kept.

A bank whose full bank keeps a sample of its lot (``full_bank_images``) grows until the lot passes that size, then
keeps the sample its settings draw for the grown lot; a sampled bank goes on growing by reservoir sampling
(``pa_clip.reservoir_step``): each image folded in takes a slot of the sample with the chance every image of the
grown lot has of being in it, so the sample stays a uniform one of the whole grown lot without the entries of the
images outside it, and the manifest records the lot sizes it grew through (``sample_growth``) so that the bank's
check can draw the same sample again.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.stats import norm

from . import kernels as K
from .bank import Bank, BankError, image_key, score_with_bank
from .contract import Features, first_ids
from .decision import EXPONENTIAL_FROM, Calibration, calibrate
from .host import DEFAULT_HOST, HostSettings
from .ood import OodCalibration, calibrate_ood, image_statistics, reason
from .pa_clip import bank_entries, full_bank_references, full_bank_selection, lot_interval_k, reservoir_step

ACCEPT_QUANTILE = 0.75  # of the lot's reference scores: a new image at or below it is an ordinary good part


def accept_level(calibration: Calibration) -> float:
    """The highest score a new image may have to be folded in, read from a bank's calibration before its first
    update (when its reference is the lot's scores alone; ``grow_bank`` keeps it from then on): the reference's
    ``ACCEPT_QUANTILE``; for a bank built before calibrations kept their scores, that quantile under the
    calibration's own model (the quartile model's median + b ln 2)."""
    if calibration.reference:
        return float(np.quantile(np.asarray(calibration.reference), ACCEPT_QUANTILE))
    above = 1.0 - ACCEPT_QUANTILE
    if calibration.method in EXPONENTIAL_FROM:  # P(score > t) = (1 - start) exp(-(t - centre) / spread)
        return float(calibration.centre + calibration.spread * math.log((1.0 - EXPONENTIAL_FROM[calibration.method])
                                                                        / above))
    return float(calibration.centre + norm.ppf(1.0 - above) * calibration.spread)


def grow_bank(bank: Bank, features: Features, images, host: HostSettings = DEFAULT_HOST) -> tuple:
    """A new bank: ``bank`` with the new images ((N, H, W, 3) uint8 as the encoder got them, and their ``features``)
    that look like its good parts folded in, and a report: how many were scored, folded in, left out and why."""
    keys = [image_key(img) for img in images]
    cfg, manifest = bank.config, bank.manifest
    if cfg.text_only:
        raise BankError(f"bank {manifest.bank!r} is a text-only baseline: it holds no lot to grow")
    xp = K.get_xp(*bank.full.values())
    ids = bank.query_ids(keys)
    # each part counts once: not a lot member, not left out by an earlier update, not sent twice in this one
    counted = set(manifest.left_out_keys or ())
    fresh = []
    for i in np.flatnonzero(ids < 0):
        if keys[i] not in counted:
            counted.add(keys[i])
            fresh.append(int(i))
    fresh = np.asarray(fresh, dtype=np.int64)
    # scores: each image's score against the bank before it grew, in the order given (None: in its lot already, or
    # counted before: left out by an earlier update or sent twice)
    report = {"scored": len(keys), "already_in_lot": int((ids >= 0).sum()),
              "already_counted": int((ids < 0).sum()) - int(fresh.size), "folded_in": 0, "left_out": [],
              "scores": [None] * len(keys), "lot_size": manifest.n_images}
    if fresh.size == 0:
        return bank, report
    new = features.take(xp.asarray(fresh))
    result = score_with_bank(bank, new, np.full(fresh.size, -1), host=host)
    scores = K.to_numpy(result.scores).astype(np.float64)
    for j, i in enumerate(fresh):
        report["scores"][i] = float(scores[j]) if np.isfinite(scores[j]) else None  # JSON has no NaN
    calibration = Calibration.from_dict(manifest.decision)
    level = accept_level(calibration) if manifest.accept_level is None else manifest.accept_level
    # an image unlike the lot as a whole is no part of this product, whatever its score (a black frame can score
    # low): folded in, its statistics widened the out-of-distribution thresholds to let the next one through
    held_ood = None if manifest.ood is None else OodCalibration.from_dict(manifest.ood)
    foreign, why = np.zeros(fresh.size, dtype=bool), [[] for _ in fresh]
    if held_ood is not None:
        ood_values = image_statistics(result.maps, np.asarray(images)[fresh], held_ood.statistics)
        foreign, why = held_ood.outside(ood_values)
    scored = np.isfinite(scores)  # a NaN score (an encoder's overflow) is no verdict: left out, not counted
    accepted = np.flatnonzero((scores <= level) & ~foreign & scored)
    for j in np.flatnonzero(~((scores <= level) & ~foreign & scored)):
        report["left_out"].append({"index": int(fresh[j]), "score": float(scores[j]) if scored[j] else None,
                                   "why": "its score is not a number: not counted, send it again" if not scored[j]
                                   else f"out of distribution: {reason(why[j])}" if foreign[j] else
                                   f"score above the lot's {ACCEPT_QUANTILE:.0%} reference ({level:.4g})"})
    if not (~foreign & scored).any():  # nothing of this product: no part folded in, no score for the calibration
        # (a new version for the keys alone started the drift window again: a wrong product's batch sent through an
        # update hid the window that had seen it); sent again, such parts are scored again and left out again
        return bank, report
    n_old = manifest.n_images
    n_new = n_old + accepted.size
    space = bank.space
    sample_growth = manifest.sample_growth
    if accepted.size:
        take = xp.asarray(accepted)
        tokens = new.layer_tokens[take]
        full, full_scale = dict(bank.full), dict(bank.full_scale)
        for r in full:
            selection = full_bank_selection(tokens, new.grid, r, cfg, space)
            entries = xp.stack([bank_entries(space.features(tokens, p, new.grid, r, cfg), selection)
                                for p in range(len(space.layers))])
            if r in full_scale:
                q, scale = K.quantize_rows(entries)
                full[r] = xp.concatenate([full[r], q], axis=1)
                full_scale[r] = xp.concatenate([full_scale[r], scale], axis=1)
            else:
                full[r] = xp.concatenate([full[r], entries.astype(xp.float16)], axis=1)
        # the full arrays now hold the old full bank's images, then the folded-in ones: where each lot image sits
        held = np.arange(n_old) if bank.full_ids is None else K.to_numpy(bank.full_ids)
        position = np.full(n_new, -1, dtype=np.int64)
        position[held] = np.arange(len(held))
        position[n_old:] = len(held) + np.arange(accepted.size)
        full_ids = None
        if bank.full_ids is not None:  # a sampled bank: the sample carried to the grown lot
            references = reservoir_step(held, n_old, n_new, cfg)
            sample_growth = (*(sample_growth or (n_old,)), n_new)
        else:  # the grown lot passes the sample's size: keep the sample its settings draw
            references = full_bank_references(n_new, cfg)
        if references is not None:
            keep = xp.asarray(position[references])
            full = {r: v[:, keep] for r, v in full.items()}
            full_scale = {r: v[:, keep] for r, v in full_scale.items()}
            full_ids = xp.asarray(references).astype(xp.int64)
        lot_embeds, lot_scores = bank.lot_embeds, bank.lot_scores
        if lot_embeds is not None:
            lot_embeds = xp.concatenate([lot_embeds, new.image_embeds[take].astype(xp.float32)])
            lot_scores = xp.concatenate([lot_scores, result.map_scores[take].astype(xp.float32)])
    else:
        full, full_scale = bank.full, bank.full_scale
        lot_embeds, lot_scores, full_ids = bank.lot_embeds, bank.lot_scores, bank.full_ids
    # the calibration read again: the lot's kept scores and every new image's (its method leaves suspected defects
    # out as a build does); a method that kept no scores keeps its calibration
    decision = manifest.decision
    if calibration.reference:  # the product's parts: one out of distribution is not (its score is no verdict)
        pooled = np.concatenate([np.asarray(calibration.reference), scores[~foreign & scored]])
        decision = calibrate(pooled, None, calibration.false_alarm_rate, calibration.method).to_dict()
    # the lot's scores as they now are: a part left out never joined the lot, so the smallest and largest are the
    # lot's and the folded-in parts' (the calibration's reference also holds parts left out); the median is read
    # off that reference with the folded-in parts, near enough for what it is: a figure info shows
    joined = scores[accepted]
    summary_scores = np.concatenate([np.asarray(calibration.reference or [manifest.lot_scores["median"]]), joined])
    lowest, highest = min([manifest.lot_scores["min"], *joined]), max([manifest.lot_scores["max"], *joined])
    left_out_keys = tuple(keys[int(fresh[j])] for j in np.delete(np.arange(fresh.size), accepted) if scored[j])
    ood = manifest.ood
    if held_ood is not None and accepted.size:  # the folded-in images' statistics join the lot's
        pooled = {n: np.concatenate([np.asarray(held_ood.references[n]), ood_values[n][accepted]])
                  for n in held_ood.statistics}
        ood = calibrate_ood(pooled, held_ood.statistics, held_ood.budget).to_dict()
    grown_keys = manifest.image_keys + tuple(keys[int(fresh[j])] for j in accepted)
    grown = manifest.replace(
        n_images=n_new, image_keys=grown_keys,
        # from the sample the grown bank keeps (a reservoir's, not a fresh draw: with copies in the lot a fresh
        # draw's k could pass the others a lot image finds in the kept one, and its maps came out infinite)
        interval_k=lot_interval_k(n_new, cfg, first_ids(grown_keys),
                                  None if full_ids is None else K.to_numpy(full_ids)),
        lot_scores={"min": float(lowest), "median": float(np.median(summary_scores)), "max": float(highest)},
        decision=decision, ood=ood, sample_growth=sample_growth,
        left_out_keys=((manifest.left_out_keys or ()) + left_out_keys) or None,
        accept_level=level if math.isfinite(level) else None,
        version=None, built_at=None,
        files=None, tensors=None)
    report["folded_in"] = int(accepted.size)
    report["lot_size"] = n_new
    return dataclasses.replace(bank, manifest=grown, full=full, full_scale=full_scale, lot_embeds=lot_embeds,
                               lot_scores=lot_scores, full_ids=full_ids), report
