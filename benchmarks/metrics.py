"""The paper's metrics: image and pixel AUROC / AP / F1-max (scikit-learn) and PRO (MVTec definition).

PRO: the mean, over connected defect regions (8-connectivity, scipy), of the fraction of each region above a
threshold, as a function of the false-positive rate on defect-free pixels; the area under that curve for FPR in
[0, 0.3], divided by 0.3. (MuSc's code leaves out the division; ours follows MVTec.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro")
# the decision at the automatic threshold (postprocess.decision): good parts called defective, defective parts found,
# and F1 (against image_f1_max, the best F1 any threshold gives: the oracle)
DECISION_KEYS = ("false_alarm_rate", "recall", "f1_auto")
ALL_KEYS = IMAGE_KEYS + PIXEL_KEYS + DECISION_KEYS


# NumPy 2 renamed trapz (the serving extra keeps NumPy 1.x, see pyproject.toml)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def f1_max(labels, scores) -> float:
    """The best F1 over all thresholds."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _both_classes(labels) -> bool:
    labels = np.asarray(labels)
    return labels.size > 0 and 0 < labels.sum() < labels.size


def image_metrics(labels, scores) -> dict:
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if not _both_classes(labels):
        return {k: None for k in IMAGE_KEYS}
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1_max": f1_max(labels, scores),
    }


def pro_score(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (exact, every distinct threshold)."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    structure = np.ones((3, 3), dtype=int)
    region_weight = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    region_labels = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        region_labels.append((labelled, count))
        n_regions += count
    negatives = ~masks
    n_neg = int(negatives.sum())
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    for i, (labelled, count) in enumerate(region_labels):
        if count:
            sizes = np.bincount(labelled.ravel())
            weight = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
            region_weight[i] = weight / n_regions
    flat_scores = maps.ravel()
    order = np.argsort(-flat_scores, kind="stable")
    pro = np.cumsum(region_weight.ravel()[order])
    fpr = np.cumsum(negatives.ravel()[order]) / n_neg
    # one curve point per distinct threshold: the last pixel of each run of equal scores
    sorted_scores = flat_scores[order]
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    if fpr[-1] < fpr_limit:  # cannot happen for a full curve (fpr ends at 1), kept for safety
        return float(_trapezoid(pro, fpr) / fpr_limit)
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x = np.r_[fpr[:cut], fpr_limit]
    y_end = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
    y = np.r_[pro[:cut], y_end]
    return float(_trapezoid(y, x) / fpr_limit)


def pixel_metrics(masks, maps) -> dict:
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float32)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    flat_labels = masks.ravel()
    if not _both_classes(flat_labels):
        return {k: None for k in PIXEL_KEYS}
    flat_scores = maps.ravel()
    return {
        "pixel_auroc": float(roc_auc_score(flat_labels, flat_scores)),
        "pixel_ap": float(average_precision_score(flat_labels, flat_scores)),
        "pixel_f1_max": f1_max(flat_labels, flat_scores),
        "pro": pro_score(masks, maps),
    }


def decision_metrics(labels, anomalous) -> dict:
    """``anomalous`` (bool per image, the decision) against the labels: the false-alarm rate on good parts, the
    recall on defective parts, F1 (scikit-learn; 0 when nothing is called defective). None where a class is
    missing."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels).astype(np.int64)
    anomalous = np.asarray(anomalous, dtype=bool)
    good, bad = labels == 0, labels == 1
    return {
        "false_alarm_rate": float(anomalous[good].mean()) if good.any() else None,
        "recall": float(anomalous[bad].mean()) if bad.any() else None,
        "f1_auto": float(f1_score(labels, anomalous.astype(np.int64), zero_division=0)) if bad.any() else None,
    }


def lot_metrics(labels, masks, scores, maps) -> dict:
    """Every metric a scored lot's labels allow: image metrics when it has image labels, pixel metrics and PRO when
    it has masks (each None where the labels hold one class only)."""
    out = {}
    if labels is not None:
        out.update(image_metrics(labels, scores))
    if masks is not None:
        out.update(pixel_metrics(masks, maps))
    return out


def per_defect_type(labels, masks, scores, maps, defect_types) -> dict:
    """``lot_metrics`` of each defect type against the good images (the paper's per-type breakdown): the lot is
    scored once, as a whole; each row keeps the good images and one defect type."""
    if labels is None:
        return {}
    types = np.asarray(defect_types)
    labels = np.asarray(labels)
    rows = {}
    for name in sorted({t for t, label in zip(types, labels) if label == 1}):
        keep = (labels == 0) | (types == name)
        rows[name] = lot_metrics(labels[keep], None if masks is None else masks[keep], np.asarray(scores)[keep],
                                 maps[keep])
    return rows


def mean_metrics(per_category: dict) -> dict:
    """Unweighted mean over categories of each metric (categories without it are left out)."""
    out = {}
    for key in ALL_KEYS:
        values = [m[key] for m in per_category.values() if m.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def f1_at_prevalence(false_alarm_rate: float, recall: float, prevalence: float) -> float:
    """F1 of a decision with this false-alarm rate and recall on a stream with ``prevalence`` defective parts (a
    line's rate, not the benchmark set's): precision = p R / (p R + (1 - p) FA)."""
    caught = prevalence * recall
    if caught <= 0:
        return 0.0
    precision = caught / (caught + (1.0 - prevalence) * false_alarm_rate)
    return float(2 * precision * recall / (precision + recall))


def f1_max_at_prevalence(labels, scores, prevalence: float) -> float:
    """The best ``f1_at_prevalence`` over all thresholds of these scores (the oracle at a line's rate)."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels).astype(np.int64)
    if not _both_classes(labels):
        return 0.0
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=np.float64))
    return max(f1_at_prevalence(f, t, prevalence) for f, t in zip(fpr, tpr))
