"""IJB-B / IJB-C 1:1 verification: alignment, template pooling, TAR at FAR, and `python -m train.ijb`
end to end on a tiny synthetic release (faces pasted into loose crops at known landmarks)."""

import heapq
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from train import checkpoint, ijb
from train.embed import load_model, model_digests
from train.data.synthetic import render_face
from train.models import get_model

from conftest import HeldFile
from trainer_fixtures import IMAGE_SIZE, REPO, fail_if_called, one_thread  # noqa: F401

CROP_SIZE = 64
IDENTITIES, TEMPLATES_PER_IDENTITY = 6, 2
SUBJECT_BASE = 500  # the 1:N lists' subject id of identity 0


def similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991) with an SVD, as skimage's SimilarityTransform.estimate computes it."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    d = np.ones(2)
    if np.linalg.det(covariance) < 0:
        d[1] = -1
    u, singular, vt = np.linalg.svd(covariance)
    rotation = u @ np.diag(d) @ vt
    scale = (singular @ d) / src_c.var(axis=0).sum()
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


# ---------------------------------------------------------------------------------------------
# Alignment


def test_estimate_similarity_inverts_a_known_transform():
    template = ijb.arcface_template(112)
    angle, scale, translation = 0.35, 1.8, np.array([40.5, -12.25])
    landmarks = apply(similarity(angle, scale, *translation), template)
    matrix = ijb.estimate_similarity(landmarks, template)
    np.testing.assert_allclose(apply(matrix, landmarks), template, atol=1e-6, rtol=0)
    assert math.hypot(matrix[0, 0], matrix[1, 0]) == pytest.approx(1 / scale, rel=1e-12)
    assert math.atan2(matrix[1, 0], matrix[0, 0]) == pytest.approx(-angle, abs=1e-12)
    np.testing.assert_allclose(matrix[:, 2], -matrix[:, :2] @ translation, atol=1e-9)


def test_estimate_similarity_is_umeyamas_least_squares_without_reflection():
    rng = np.random.default_rng(0)
    template = ijb.arcface_template(112)
    for trial in range(20):
        landmarks = apply(similarity(rng.uniform(-3, 3), rng.uniform(0.3, 4), *rng.uniform(-50, 50, 2)), template)
        landmarks += rng.normal(scale=3.0, size=landmarks.shape)
        if trial % 2:
            landmarks[:, 0] *= -1  # a mirrored face: the best similarity must still not reflect
        matrix = ijb.estimate_similarity(landmarks, template)
        np.testing.assert_allclose(matrix, umeyama(landmarks, template), atol=1e-9, rtol=1e-9)
        assert np.linalg.det(matrix[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        ijb.estimate_similarity(np.ones((5, 2)), template)


def test_template_is_scaled_as_insightface_scales_it():
    np.testing.assert_array_equal(ijb.arcface_template(112), ijb.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(ijb.arcface_template(224), 2 * ijb.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(ijb.arcface_template(128), ijb.ARCFACE_TEMPLATE + [8, 0])  # the 128 crop
    np.testing.assert_allclose(ijb.arcface_template(32), ijb.ARCFACE_TEMPLATE / 4 + [2, 0])


def test_warp_places_pixel_centres_as_opencv_does():
    # A quarter turn plus a whole-pixel shift maps pixel centres onto pixel centres: every output
    # pixel is one input pixel, exactly, and a half-pixel slip anywhere would blend neighbours.
    y, x = np.mgrid[0:24, 0:32]
    board = np.where((x // 4 + y // 4) % 2 == 0, 230, 20).astype(np.uint8)
    board = np.stack([board, 255 - board, (7 * x + 3 * y).astype(np.uint8)], axis=-1)
    matrix = similarity(math.pi / 2, 1.0, 26.0, -3.0)  # (x, y) -> (26 - y, x - 3)
    out = ijb.warp_affine(Image.fromarray(board), matrix, 20)
    v, u = np.mgrid[0:20, 0:20]
    src_x, src_y = v + 3, 26 - u
    inside = (src_x < 32) & (src_y >= 0) & (src_y < 24)
    np.testing.assert_array_equal(out[inside], board[src_y[inside], src_x[inside]])
    assert inside.sum() > 200 and not out[~inside].any()  # black outside the image


def bilinear_with_black_border(image, x, y):
    """OpenCV's bilinear sample of ``image`` at (x, y), pixel centres at integers, zero beyond it."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    dx, dy = (x - x0)[..., None], (y - y0)[..., None]

    def at(yy, xx):
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        return np.where(inside[..., None], image[yy.clip(0, h - 1), xx.clip(0, w - 1)], 0.0)

    top = (1 - dx) * at(y0, x0) + dx * at(y0, x0 + 1)
    bottom = (1 - dx) * at(y0 + 1, x0) + dx * at(y0 + 1, x0 + 1)
    return (1 - dy) * top + dy * bottom


def test_warp_is_bilinear_rounded_and_fades_to_black_at_the_edges():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    matrix = similarity(0.3, 0.6, 4.5, 2.25)  # the image (48 x 36 once scaled) overhangs 40 x 40 at the side
    out = ijb.warp_affine(Image.fromarray(image), matrix, 40).astype(np.float64)
    v, u = np.mgrid[0:40, 0:40]
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    x = inverse[0, 0] * u + inverse[0, 1] * v + inverse[0, 2]
    y = inverse[1, 0] * u + inverse[1, 1] * v + inverse[1, 2]
    expected = bilinear_with_black_border(image.astype(np.float64), x, y)
    error = np.abs(out - expected)
    # Rounded, not truncated (Pillow's own 8-bit warp truncates); the edge band blends into black.
    assert error.max() <= 0.5 + 1e-3, f"max error {error.max():.3f} at {np.unravel_index(error.argmax(), error.shape)}"
    edge = ((x > -1) & (x < 0)) | ((y > -1) & (y < 0)) | ((x > 79) & (x < 80)) | ((y > 59) & (y < 60))
    assert edge.sum() > 20 and ((x < -1) | (y < -1) | (x > 80) | (y > 60)).sum() > 20


# ---------------------------------------------------------------------------------------------
# TAR at FAR


def brute_force_tar(scores, issame, far):
    """The most positives any threshold t accepts (score > t) with at most FAR of the negatives."""
    positives, negatives = scores[issame], scores[~issame]
    best = None
    for t in np.concatenate([[-np.inf], np.unique(scores)]):
        if np.mean(negatives > t) <= far:
            tar = np.mean(positives > t)
            best = tar if best is None else max(best, tar)
    return best


@pytest.mark.parametrize("negatives", [997, 1000])
def test_tar_at_far_matches_brute_force_with_ties(negatives):
    rng = np.random.default_rng(negatives)
    issame = np.r_[np.ones(137, bool), np.zeros(negatives, bool)]
    # Scores on a coarse grid, so that many positives and negatives tie with each other.
    scores = np.round(np.where(issame, rng.normal(0.6, 0.2, issame.size), rng.normal(0.2, 0.2, issame.size)), 2)
    fars = (1e-4, 1e-3, 5e-3, 1e-2, 1e-1, 0.5)
    for row in ijb.tar_at_far(scores, issame, fars):
        if row["far"] * negatives < 1:
            assert row["tar"] is None and row["threshold"] is None, row
            continue
        assert row["tar"] == brute_force_tar(scores, issame, row["far"]), row
        assert row["false_accepts"] == np.sum(scores[~issame] > row["threshold"]) <= row["far"] * negatives


def test_tar_at_far_by_hand():
    # Negatives 0.9, 0.5, 0.5, 0.1; positives 0.95, 0.6, 0.5, 0.05.
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.95, 0.6, 0.5, 0.05])
    issame = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    rows = ijb.tar_at_far(scores, issame, (0.2, 0.25, 0.5, 0.75, 1.0))
    assert rows[0] == {"far": 0.2, "tar": None, "threshold": None, "false_accepts": None}  # 0.8 false accepts
    assert rows[1] == {"far": 0.25, "tar": 0.5, "threshold": 0.5, "false_accepts": 1}
    # Two false accepts allowed, but the next negatives tie at 0.5: both stay rejected.
    assert rows[2] == {"far": 0.5, "tar": 0.5, "threshold": 0.5, "false_accepts": 1}
    assert rows[3] == {"far": 0.75, "tar": 0.75, "threshold": 0.1, "false_accepts": 3}
    assert rows[4] == {"far": 1.0, "tar": 1.0, "threshold": -math.inf, "false_accepts": 4}
    with pytest.raises(ValueError, match="positive and negative"):
        ijb.tar_at_far(scores, np.zeros(8, bool))


# ---------------------------------------------------------------------------------------------
# 1:N identification


def unit_rows(rng, count, dim, *, grid=None):
    rows = rng.normal(size=(count, dim))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows if grid is None else np.round(rows / grid) * grid  # on a grid: scores tie


def brute_force_identification(probes, probe_subjects, gallery, gallery_subjects, fpir, rank):
    """CMC at ``rank`` and the best TPIR of any threshold whose FPIR is at most ``fpir``, probe by probe."""
    scores = probes @ gallery.T
    ranks, mate_scores, non_mated_best = [], [], []
    for i, subject in enumerate(probe_subjects):
        rows = np.flatnonzero(gallery_subjects == subject)
        if rows.size:
            mate = scores[i, rows[0]]
            others = np.delete(scores[i], rows[0])
            ranks.append(1 + np.sum(others >= mate))
            mate_scores.append(mate)
        else:
            non_mated_best.append(scores[i].max())
    ranks, mate_scores, non_mated_best = map(np.array, (ranks, mate_scores, non_mated_best))
    best = None
    for t in np.concatenate([[-np.inf], np.unique(non_mated_best)]):
        if np.mean(non_mated_best > t) <= fpir:
            tpir = np.mean((ranks == 1) & (mate_scores > t))
            best = tpir if best is None else max(best, tpir)
    return np.mean(ranks <= rank), best


@pytest.mark.parametrize("grid", [None, 0.25])
def test_open_set_identification_matches_brute_force(grid):
    rng = np.random.default_rng(7)
    gallery_subjects = rng.permutation(400)[:60]
    probe_subjects = rng.integers(0, 400, 700)  # most without a mate
    gallery = unit_rows(rng, 60, 8, grid=grid)
    # Each probe near its subject's direction, the unenrolled subjects' too.
    directions = unit_rows(rng, 400, 8, grid=grid)
    directions[gallery_subjects] = gallery
    probes = directions[probe_subjects] + 0.6 * rng.normal(size=(700, 8))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    if grid:
        probes = np.round(probes / grid) * grid
    fpirs = (1e-3, 1e-2, 0.05, 0.1, 0.5)
    result = ijb.open_set_identification(probes, probe_subjects, gallery, gallery_subjects, fpirs=fpirs)
    mated = int(np.isin(probe_subjects, gallery_subjects).sum())
    assert (result["mated_searches"], result["non_mated_searches"], result["templates"]) == (mated, 700 - mated, 60)
    assert 50 < mated < 200
    for row in result["tpir_at_fpir"]:
        rank_1, tpir = brute_force_identification(probes, probe_subjects, gallery, gallery_subjects, row["fpir"], 1)
        if row["fpir"] * (700 - mated) < 1:
            assert row["tpir"] is None and row["threshold"] is None
            continue
        assert row["tpir"] == pytest.approx(tpir, abs=1e-12), row
        assert row["false_alarms"] <= row["fpir"] * (700 - mated)
    for k in (1, 5, 10):
        assert result["rank"][k] == pytest.approx(
            brute_force_identification(probes, probe_subjects, gallery, gallery_subjects, 1.0, k)[0], abs=1e-12)
    # The chunking changes nothing but the scores' last bit: BLAS's kernels for 7 rows and for 700 round
    # differently on some CPUs (OpenBLAS picks them by CPU; on an AMD EPYC with numpy 2.4.6, 49 of 700 best
    # scores 1 ulp apart, where an Intel Xeon gave equal ones). On the grid every product is exact.
    mates = ijb.mate_index(probe_subjects, gallery_subjects)
    whole, small = ijb.search_gallery(probes, gallery, mates), ijb.search_gallery(probes, gallery, mates, chunk=7)
    for a, b in zip(whole[:2], small[:2]):
        np.testing.assert_allclose(a, b, rtol=0, atol=0 if grid else 1e-14)
    np.testing.assert_array_equal(whole[2], small[2])


def test_open_set_identification_by_hand():
    # Gallery: subjects 1 and 2 along x and y. Probes: subject 1 near x (mated, rank 1, score 0.8),
    # subject 2 nearer x than y (mated, rank 2), subjects 7 and 8 unenrolled (best scores 0.6, 0.3).
    gallery, gallery_subjects = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 2])
    probes = np.array([[0.8, 0.6], [0.8, 0.6 - 0.2], [0.6, -0.8], [-0.954, 0.3]])
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    result = ijb.open_set_identification(probes, np.array([1, 2, 7, 8]), gallery, gallery_subjects,
                                         fpirs=(0.4, 0.5, 1.0))
    assert result["rank"] == {1: 0.5, 5: 1.0, 10: 1.0}
    no_alarm, one_alarm, any_alarm = result["tpir_at_fpir"]
    assert no_alarm == {"fpir": 0.4, "tpir": None, "threshold": None, "false_alarms": None}  # 0.8 alarms allowed
    assert one_alarm["threshold"] == pytest.approx(0.3, abs=1e-3) and one_alarm["false_alarms"] == 1
    assert one_alarm["tpir"] == 0.5  # subject 2's mate is not the best
    assert any_alarm == {"fpir": 1.0, "tpir": 0.5, "threshold": -math.inf, "false_alarms": 2}


def insightface_1n(probes, probe_subjects, gallery, gallery_subjects, fars=(0.01, 0.1)):
    """insightface's ijb_1n.py evaluation, step for step as that script takes them."""
    similarity = probes @ gallery.T
    top_inds = np.argsort(-similarity)
    mask = [int(np.flatnonzero(gallery_subjects == s)[0]) for s in probe_subjects]
    tops = [np.mean([mask[i] in top_inds[i, :k] for i in range(len(mask))]) for k in (1, 5, 10)]
    required = [math.ceil(len(mask) * f) for f in fars]
    sims = similarity.copy()
    positives = np.array([sims[i, g] for i, g in enumerate(mask)])
    for i, g in enumerate(mask):
        sims[i, g] = -2.0
    negatives = heapq.nlargest(max(required), sims[sims > -2.0])
    return tops, [float(np.sum(positives > negatives[k - 1]) / len(mask)) for k in required], \
        [negatives[k - 1] for k in required]


def test_insightface_identification_is_its_scripts():
    rng = np.random.default_rng(3)
    gallery_subjects = rng.permutation(1000)[:300]
    gallery = unit_rows(rng, 300, 16)
    mates = rng.integers(0, 300, 2500)
    probes = gallery[mates] + 0.35 * rng.normal(size=(2500, 16))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    ours = ijb.insightface_identification(probes, gallery_subjects[mates], gallery, gallery_subjects, chunk=1000)
    tops, rates, thresholds = insightface_1n(probes, gallery_subjects[mates], gallery, gallery_subjects)
    assert [ours["rank"][k] for k in (1, 5, 10)] == tops
    assert [row["tpir"] for row in ours["tpir_at_fpir"]] == rates
    # (to the last bit but one: ours takes the probes' similarities 1000 rows at a time, and a BLAS may
    # round a chunk's product otherwise than the whole one's; numpy 1.26.4's OpenBLAS did, by 1 ulp)
    assert [row["threshold"] for row in ours["tpir_at_fpir"]] == pytest.approx(thresholds, rel=1e-15, abs=0)
    assert 0.3 < tops[0] < 0.95 and 0 < rates[0] < rates[1] < 1  # neither trivial nor hopeless
    with pytest.raises(ValueError, match="the probes' subject 5000 has no gallery template \\(1 probe has none\\)"):
        ijb.insightface_identification(probes[:2], np.array([gallery_subjects[0], 5000]), gallery, gallery_subjects)
    with pytest.raises(ValueError, match="subject 3 has two gallery templates"):
        ijb.mate_index(np.array([3]), np.array([1, 3, 2, 3]))


def test_template_subject_lists(tmp_path):
    path = tmp_path / "g.csv"
    # As the release writes them: a header (here after a byte-order mark), a row an image, more columns.
    path.write_text("\ufeffTEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n5,50,img/1.jpg,1\n\n5,50,img/2.jpg,2\n"
                    "3,30,frames/7.png,3\n")
    templates, subjects, lines = ijb.read_template_subjects(str(path))
    assert templates.tolist() == [5, 3] and subjects.tolist() == [50, 30] and lines.tolist() == [2, 5]
    path.write_text("SUBJECT_ID,TEMPLATE_ID\n50,5\n")  # columns found by name
    assert ijb.read_template_subjects(str(path))[0].tolist() == [5]
    path.write_text("5,50\n6,60,x\n")  # no header: the first two columns
    assert ijb.read_template_subjects(str(path))[1].tolist() == [50, 60]
    for text, message in [("TEMPLATE_ID,SUBJECT_ID\n5,50\n5,51\n",
                           "line 3: template 5 is listed with subject 51, and with subject 50 on line 2"),
                          ("TEMPLATE,SUBJECT\n5,50\n", "line 1: expected a header with TEMPLATE_ID and SUBJECT_ID"),
                          ("TEMPLATE_ID,SUBJECT_ID\n5,x\n", "line 2: expected a template id and a subject id"),
                          ("TEMPLATE_ID,SUBJECT_ID\n", "no templates listed"),
                          # A quote left open swallows the lines after it, or runs to the end.
                          ('TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50,"img/1.jpg\n6,60,img/2.jpg"\n7,70,img/3.jpg\n',
                           "line 2: a quoted field runs over lines 2-3 \\(a quote left open\\?\\)"),
                          ('TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50,"img/1.jpg\n6,60,img/2.jpg\n',
                           "line 2: not readable as CSV: unexpected end of data"),
                          ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50," + "x" * 200_000 + "\n",
                           "line 2: not readable as CSV: field larger than field limit")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            ijb.read_template_subjects(str(path))
    path.write_bytes("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,50,caf\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"g.csv: not UTF-8 text: invalid continuation byte \(byte 0xe9\)"):
        ijb.read_template_subjects(str(path))


# ---------------------------------------------------------------------------------------------
# Templates and scores


def pooled_by_hand(features, templates, medias, face_image, weights):
    """insightface's image2template_feature, loop by loop."""
    result = {}
    for t in sorted(set(templates)):
        total = np.zeros(features.shape[1])
        for m in sorted({m for tt, m in zip(templates, medias) if tt == t}):
            frames = [weights[i] * features[i].astype(np.float64)
                      for tt, mm, i in zip(templates, medias, face_image) if tt == t and mm == m]
            total += np.mean(frames, axis=0)
        norm = np.linalg.norm(total)
        result[t] = total / norm if norm > 0 else total
    return result


def test_template_features_match_a_loop():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 6)).astype(np.float32)
    # Template 5: media 1 holds three frames, media 3 one photo; template 9 also has a media 1,
    # which is its own (media group within a template); image 2 appears in two templates.
    templates = np.array([5, 5, 5, 5, 9, 9, 2, 2, 2, 7, 7, 7])
    medias = np.array([1, 1, 1, 3, 1, 4, 8, 8, 6, 1, 1, 2])
    face_image = np.array([0, 1, 2, 3, 4, 2, 5, 6, 7, 8, 9, 9])
    weights = rng.uniform(0.1, 1.0, 10)
    weights[[8, 9]] = 0  # template 7: a zero sum stays zero rather than becoming NaN
    ids, pooled = ijb.template_features(features, templates, medias, face_image=face_image, weights=weights)
    expected = pooled_by_hand(features, templates, medias, face_image, weights)
    assert ids.tolist() == [2, 5, 7, 9]
    for k, t in enumerate(ids):
        np.testing.assert_allclose(pooled[k], expected[t], rtol=1e-12, atol=1e-15, err_msg=f"template {t}")
    assert not pooled[2].any()


def test_image_weights_are_insightfaces_norm_and_detector_options():
    features = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.1], dtype=np.float32)
    assert ijb.image_weights(features) is None  # N1 without D1: features as they are
    np.testing.assert_allclose(ijb.image_weights(features, scores), scores)
    np.testing.assert_allclose(ijb.image_weights(features, norm_score=False), [0.2, 0.0, 1.0])
    np.testing.assert_allclose(ijb.image_weights(features, scores, norm_score=False), [0.1, 0.0, 0.1], rtol=1e-6)


def test_pair_scores_do_not_depend_on_the_chunk_size():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 64))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    first, second = rng.integers(0, 50, 1001), rng.integers(0, 50, 1001)
    whole = ijb.pair_scores(features, first, second, chunk=10_000)
    for chunk in (1, 7, 256):
        np.testing.assert_array_equal(ijb.pair_scores(features, first, second, chunk=chunk), whole)
    np.testing.assert_allclose(whole, np.sum(features[first] * features[second], axis=1), rtol=0, atol=1e-15)


def test_json_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    checkpoint.write_json_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


# ---------------------------------------------------------------------------------------------
# End to end on a synthetic release


def write_release(root, target="IJBC"):
    """IDENTITIES x TEMPLATES_PER_IDENTITY templates, each one photo plus a two-frame video;
    every face pasted into a loose crop by a random similarity, its landmarks the template's image.
    Returns the faces as rendered (aligned), in image order."""
    rng = np.random.default_rng(0)
    meta, crops = os.path.join(root, "meta"), os.path.join(root, "loose_crop")
    os.makedirs(meta)
    os.makedirs(crops)
    # Where a 112-pixel crop resized to IMAGE_SIZE (pixel centres matched, as Pillow resizes) has them.
    template = (ijb.ARCFACE_TEMPLATE + 0.5) * (IMAGE_SIZE / 112) - 0.5
    faces, tid_mid, landmark_lines, templates = [], [], [], []
    for who in range(IDENTITIES):
        for _ in range(TEMPLATES_PER_IDENTITY):
            template_id = 100 + len(templates)
            templates.append((template_id, who))
            for media_id, frames in ((1000 + template_id, 1), (2000 + template_id, 2)):
                for _ in range(frames):
                    face = render_face(0, 20_000 + who, len(faces), IMAGE_SIZE)
                    paste = similarity(rng.uniform(-0.4, 0.4), rng.uniform(1.2, 1.5), 0, 0)
                    centre = np.full(2, IMAGE_SIZE / 2 - 0.5)  # lands near the crop's centre
                    paste[:, 2] = centre * CROP_SIZE / IMAGE_SIZE - paste[:, :2] @ centre + rng.uniform(-3, 3, 2)
                    name = f"{len(faces) + 1}.jpg"
                    crop = ijb.warp_affine(Image.fromarray(face), paste, CROP_SIZE)
                    Image.fromarray(crop).save(os.path.join(crops, name), quality=95)
                    points = " ".join(f"{v:.4f}" for v in apply(paste, template).reshape(-1))
                    landmark_lines.append(f"{name} {points} {rng.uniform(0.5, 1.0):.3f}\n")
                    tid_mid.append(f"{name} {template_id} {media_id}\n")
                    faces.append(face)
    pairs = [f"{a} {b} {int(wa == wb)}\n" for i, (a, wa) in enumerate(templates) for b, wb in templates[i + 1:]]
    prefix = os.path.join(meta, target.lower())
    for suffix, lines in (("name_5pts_score", landmark_lines), ("face_tid_mid", tid_mid),
                          ("template_pair_label", pairs)):
        with open(f"{prefix}_{suffix}.txt", "w") as f:
            f.writelines(lines)
    # 1:N, as the release's CSVs list it (a row a face image, subject ids of their own): each identity's
    # first template enrolled, the first half of the identities in G1, the others in G2; the second
    # templates are the probes.
    images_of = {}
    for line in tid_mid:
        name, template_id, _ = line.split()
        images_of.setdefault(int(template_id), []).append(name)
    lists = {"gallery_G1": templates[0:2 * (IDENTITIES // 2):2], "gallery_G2": templates[2 * (IDENTITIES // 2)::2],
             "probe_mixed": templates[1::2]}
    for name, chosen in lists.items():
        with open(f"{prefix}_1N_{name}.csv", "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.writelines(f"{t},{SUBJECT_BASE + who},img/{image}\n" for t, who in chosen for image in images_of[t])
    return np.stack(faces)


def write_backbone(folder) -> str:
    """A small untrained backbone, saved as python -m train.export saves one."""
    torch.manual_seed(0)
    model = get_model("small", embedding_size=32, image_size=IMAGE_SIZE)
    path = os.path.join(folder, "backbone.pt")
    checkpoint.save_atomic(model.state_dict(), path)
    with open(os.path.join(folder, "backbone.json"), "w") as f:
        json.dump({"network": "small", "embedding_size": 32, "image_size": IMAGE_SIZE}, f)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    faces = write_release(str(root / "IJBC"))
    return str(root / "IJBC"), write_backbone(str(root)), faces


def test_loose_crops_align_back_to_the_faces(release):
    data, _, faces = release
    protocol = ijb.read_protocol(data, "IJBC")
    crops = ijb.LooseCrops(protocol.image_folder, protocol.image_names, protocol.landmarks, IMAGE_SIZE)
    inner = slice(3, -3)  # the rim of the pasted square meets black

    def error(image, face):
        return np.abs(image.astype(np.float64) - face)[inner, inner].mean()

    for i in (0, 7, len(faces) - 1):
        crop, failure = crops[i]
        assert failure == "" and crop.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        aligned = crop.numpy().transpose(1, 2, 0)
        # Pasting, JPEG and aligning back blur the sensor noise away, so the crop is not the face
        # pixel for pixel; but it is the best fit: landmarks off by half a pixel fit worse.
        with Image.open(os.path.join(protocol.image_folder, protocol.image_names[i])) as image:
            for shift in ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)):
                off = ijb.align_for_model(image, protocol.landmarks[i] + shift, IMAGE_SIZE)
                assert error(aligned, faces[i]) < error(off, faces[i]), (i, shift)
        assert error(aligned, faces[i]) < error(aligned, faces[(i + 4) % len(faces)]) / 3


def test_loose_crops_follow_the_exif_orientation(release, tmp_path):
    # A file stored on its side with orientation 6 ("rotate 90° clockwise to view"), as cameras
    # write them: the landmarks are in the upright image, as OpenCV's imread gives it.
    data, _, _ = release
    protocol = ijb.read_protocol(data, "IJBC")
    name, landmarks = protocol.image_names[0], protocol.landmarks[:1]
    with Image.open(os.path.join(protocol.image_folder, name)) as image:
        upright = image.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    crops = ijb.LooseCrops(str(tmp_path), ["turned.png", "upright.png"], np.concatenate([landmarks, landmarks]),
                           IMAGE_SIZE)
    (turned, failure), (expected, _) = crops[0], crops[1]
    assert failure == "" and torch.equal(turned, expected)


def test_main_end_to_end(release, tmp_path, capsys):
    data, model, faces = release
    output, features_path = tmp_path / "out" / "ijbc.json", tmp_path / "feats.npy"
    argv = ["--model", model, "--data-root", os.path.dirname(data), "--batch-size", "8", "--workers", "1",
            "--device", "cpu", "--output", str(output), "--save-features", str(features_path)]
    assert ijb.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())

    images, templates = len(faces), IDENTITIES * TEMPLATES_PER_IDENTITY
    pairs = templates * (templates - 1) // 2
    positives = IDENTITIES * TEMPLATES_PER_IDENTITY * (TEMPLATES_PER_IDENTITY - 1) // 2
    assert result["target"] == "IJBC"
    assert result["options"] == {"flip": True, "detector_score": True, "norm_score": True, "image_size": IMAGE_SIZE,
                                 "network": "small", "batch_size": 8, "device": "cpu",
                                 "amp": "none"}
    assert result["counts"] == {"images": images, "faces": images, "media": 2 * templates, "templates": templates,
                                "pairs": pairs, "positive_pairs": positives, "negative_pairs": pairs - positives,
                                "unusable_landmarks": 0}
    keys = ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert list(result["tar_at_far"]) == keys
    # 60 negative pairs: only FAR = 0.1 (6 false accepts) can be measured.
    assert all(result["tar_at_far"][k] is None for k in keys[:-1])
    tar = result["tar_at_far"]["1e-01"]
    assert 0.0 <= tar <= 1.0 and result["false_accepts_at_far"]["1e-01"] <= 6
    assert "TAR (%)" in printed and f"{100 * tar:.2f}" in printed and "FAR below 1/60" in printed
    assert f"wrote {output}" in printed
    assert sorted(os.listdir(output.parent)) == ["ijbc.json"]  # no temporary file left behind

    # The saved features are the backbone's embeddings of the faces as rendered, up to the blur of
    # pasting and aligning back; scoring them again gives the JSON's TAR.
    saved = np.load(features_path)
    assert saved.shape == (images, 32)
    assert (tmp_path / "feats.txt").read_text().split() == [f"{i + 1}.jpg" for i in range(images)]
    backbone, _ = checkpoint.load_backbone(model)
    with torch.no_grad():
        x = (torch.from_numpy(faces).permute(0, 3, 1, 2).float() - 127.5) / 127.5
        direct = (backbone(x) + backbone(torch.flip(x, dims=[3]))).numpy()
    cosine = np.sum(saved * direct, axis=1) / np.linalg.norm(saved, axis=1) / np.linalg.norm(direct, axis=1)
    assert cosine.min() > 0.9, cosine.min()
    protocol = ijb.read_protocol(data, "IJBC")
    ids, pooled = ijb.template_features(saved, protocol.templates, protocol.medias, face_image=protocol.face_image,
                                        weights=ijb.image_weights(saved, protocol.detector_scores))
    index = np.searchsorted(ids, protocol.pairs)
    scores = ijb.pair_scores(pooled, index[:, 0], index[:, 1])
    assert ijb.tar_at_far(scores, protocol.issame, (0.1,))[0]["tar"] == tar

    # The release holds the 1:N lists, so 1:N ran too (auto), and its figures are those of the saved
    # features' templates searched in each gallery.
    assert result["protocols"] == ["1:1", "1:N"] and "1:N identification, 6 probe templates" in printed
    found = result["identification"]
    assert found["probe_templates"] == IDENTITIES and list(found["galleries"]) == ["G1", "G2"]
    lists = ijb.read_protocol(data, "IJBC", ("1:N",)).identification
    probes = pooled[np.searchsorted(ids, lists.probes[0])]
    for name, (templates, subjects) in lists.galleries.items():
        expected = ijb.open_set_identification(probes, lists.probes[1], pooled[np.searchsorted(ids, templates)],
                                               subjects)
        assert found["galleries"][name]["rank_1"] == expected["rank"][1]
        assert (found["galleries"][name]["mated_searches"], found["galleries"][name]["non_mated_searches"]) == (3, 3)
    assert found["mean"]["rank_1"] == np.mean([g["rank_1"] for g in found["galleries"].values()])
    assert found["insightface"]["gallery"] == "G1+G2" and found["insightface"]["templates"] == IDENTITIES
    assert "insightface's ijb_1n.py figures, G1+G2" in printed

    # The options change what is computed and are recorded.
    assert ijb.main(argv[:-4] + ["--output", str(output), "--no-flip", "--no-detector-score", "--workers", "0",
                                 "--overwrite"]) == 0
    options = json.loads(output.read_text())["options"]
    assert options["flip"] is False and options["detector_score"] is False


def test_an_onnx_model_gives_its_state_dicts_features(release, tmp_path):
    """`--model x.onnx` (insightface's released models are ONNX files): train.export's graph of the
    backbone gives the features its state dict gives."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train import export

    data, model, _ = release
    backbone, settings = checkpoint.load_backbone(model)
    graph = str(tmp_path / "backbone.onnx")
    export.export_onnx(backbone, graph, settings["image_size"])
    features = {}
    for name, path in (("pt", model), ("onnx", graph)):
        out = tmp_path / f"{name}.npy"
        assert ijb.main(["--model", path, "--data-root", data, "--workers", "0", "--device", "cpu", "--output",
                         str(tmp_path / f"{name}.json"), "--save-features", str(out)]) == 0
        features[name] = np.load(out)
    np.testing.assert_allclose(features["onnx"], features["pt"], rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "onnx.json").read_text())["options"]["network"] == "onnx"


def test_features_of_unit_length_are_said_to_lose_the_norm_weighting(release, tmp_path, capsys):
    """insightface's IJB evaluation weighs a template's faces by their feature norm (--norm-score):
    a model that normalises its output (train.export's backbone_normalized.onnx), or a table of
    train.embed's unit-length features, has none, and the run says so (the scores are still computed)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train import export

    data, model, _ = release
    base = ["--data-root", data, "--workers", "0", "--device", "cpu", "--protocol", "1:1"]
    backbone, settings = checkpoint.load_backbone(model)
    graph = str(tmp_path / "backbone_normalized.onnx")
    export.export_onnx(export.FlipNormalized(backbone).eval(), graph, settings["image_size"])
    for path, noted in ((model, False), (graph, True)):
        assert ijb.main(["--model", path, *base, "--output", str(tmp_path / "r.json"), "--overwrite"]) == 0
        assert ("features of unit length" in capsys.readouterr().err) == noted, path
    names = ijb.read_protocol(data, "IJBC", ("1:1",)).image_names
    unit = np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ijb.write_table(str(tmp_path / "unit.npy"), names, unit)
    for extra, noted in (([], True), (["--no-norm-score"], False)):
        assert ijb.main(["--features", str(tmp_path / "unit.npy"), *base, "--output", str(tmp_path / "u.json"),
                         "--overwrite", *extra]) == 0
        err = capsys.readouterr().err
        assert (f"note: {tmp_path / 'unit.npy'} holds features of unit length" in err) == noted, err


def test_unusable_landmarks_make_a_black_crop_as_in_insightface(release, tmp_path, capsys):
    # skimage's estimate is NaN for coincident points, and OpenCV warps a NaN matrix to black.
    data, model, _ = release
    copy = str(tmp_path / "IJBC")
    shutil.copytree(data, copy)
    corrupt(f"{copy}/meta/ijbc_name_5pts_score.txt", 3, "3.jpg " + " ".join(["20.0"] * 10) + " 0.9")
    output, features = tmp_path / "ijbc.json", tmp_path / "feats.npy"
    assert ijb.main(["--model", model, "--data-root", copy, "--workers", "0", "--device", "cpu",
                     "--output", str(output), "--save-features", str(features)]) == 0
    assert "note: 1 images have coincident or non-finite landmarks" in capsys.readouterr().out
    assert json.loads(output.read_text())["counts"]["unusable_landmarks"] == 1
    backbone, _ = checkpoint.load_backbone(model)
    with torch.no_grad():
        black = 2 * backbone(torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), -1.0))[0].numpy()  # a black crop is its mirror
    np.testing.assert_allclose(np.load(features)[2], black, rtol=1e-5, atol=1e-6)
    # The model's digests, as train.embed's tables record them (search and cluster tell a table's model by them).
    about = json.loads((tmp_path / "feats.npy.json").read_text())
    assert {key: about[key] for key in ("model_sha256", "model_weights_sha256")} == model_digests(
        model, load_model(model, "cpu")[0])


def corrupt(path, line_no, text):
    with open(path) as f:
        lines = f.readlines()
    if line_no > len(lines):
        lines.append(text + "\n")
    else:
        lines[line_no - 1] = text + "\n"
    with open(path, "w") as f:
        f.writelines(lines)


@pytest.mark.parametrize("mutation, message", [
    (lambda d: corrupt(f"{d}/meta/ijbc_face_tid_mid.txt", 3, "3.jpg 100"),
     "ijbc_face_tid_mid.txt: line 3: expected 'image_name template_id media_id'"),
    (lambda d: corrupt(f"{d}/meta/ijbc_name_5pts_score.txt", 2, "2.jpg 1 2 3 4 5 6 7 8 9 x 0.9"),
     "ijbc_name_5pts_score.txt: line 2: expected 'image_name x1 y1 ... x5 y5 score'"),
    (lambda d: corrupt(f"{d}/meta/ijbc_template_pair_label.txt", 4, "100 104 yes"),
     "ijbc_template_pair_label.txt: line 4: expected 'template1 template2 0|1'"),
    (lambda d: corrupt(f"{d}/meta/ijbc_template_pair_label.txt", 5, "100 104 2"),
     "ijbc_template_pair_label.txt: line 5: label 2 is neither 1"),
    (lambda d: corrupt(f"{d}/meta/ijbc_template_pair_label.txt", 67, "100 999 0"),
     "ijbc_template_pair_label.txt: line 67: template 999 is not in"),
    (lambda d: corrupt(f"{d}/meta/ijbc_face_tid_mid.txt", 6, "nope.jpg 101 5"),
     "ijbc_face_tid_mid.txt: line 6: nope.jpg has no landmarks in"),
    (lambda d: os.remove(f"{d}/loose_crop/5.jpg"), "ijbc_name_5pts_score.txt: line 5: no image at"),
    (lambda d: open(f"{d}/loose_crop/4.jpg", "wb").write(b"not a jpeg"),
     "4.jpg: cannot read the image: not an image format Pillow reads"),
    (lambda d: shutil.rmtree(f"{d}/meta"), "no meta/ folder"),
    (lambda d: shutil.rmtree(f"{d}/loose_crop"), "no loose_crop/ folder in "),  # (was: no image at .../1.jpg)
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_gallery_G2.csv", 3, "999,503,img/x.jpg"),
     "ijbc_1N_gallery_G2.csv: line 3: template 999 is not in"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_gallery_G1.csv", 3, "100,509,img/x.jpg"),
     "ijbc_1N_gallery_G1.csv: line 3: template 100 is listed with subject 509, and with subject 500 on line 2"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_gallery_G1.csv", 11, "106,501,img/x.jpg"),
     "ijbc_1N_gallery_G1.csv: line 11: subject 501 has a second template, 106 (the first, 102, on line 5)"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_probe_mixed.csv", 1, "TEMPLATE,SUBJECT"),
     "ijbc_1N_probe_mixed.csv: line 1: expected a header with TEMPLATE_ID and SUBJECT_ID"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_gallery_G2.csv", 11, "104,502,img/x.jpg"),
     "ijbc_1N_gallery_G2.csv: line 11: template 104 is also in gallery G1 (ijbc_1N_gallery_G1.csv, line 8)"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_gallery_G2.csv", 11, "105,500,img/x.jpg"),
     "ijbc_1N_gallery_G2.csv: line 11: subject 500 is also in gallery G1 (ijbc_1N_gallery_G1.csv, line 2): the "
     "galleries hold different subjects"),
    (lambda d: corrupt(f"{d}/meta/ijbc_1N_probe_mixed.csv", 20, "100,500,img/x.jpg"),
     "ijbc_1N_probe_mixed.csv: line 20: template 100 is a gallery template of G1 (ijbc_1N_gallery_G1.csv, line 2): "
     "a probe would find itself"),
    (lambda d: open(f"{d}/meta/ijbc_face_tid_mid.txt", "ab").write(b"caf\xe9.jpg 100 1\n"),
     "ijbc_face_tid_mid.txt: not UTF-8 text: invalid continuation byte (byte 0xe9) after line"),
])
def test_bad_input_is_an_error_message(release, tmp_path, capsys, mutation, message):
    data, model, _ = release
    copy = str(tmp_path / "IJBC")
    shutil.copytree(data, copy)
    mutation(copy)
    output = tmp_path / "ijbc.json"
    argv = ["--model", model, "--data-root", copy, "--workers", "0", "--device", "cpu", "--output", str(output)]
    assert ijb.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ijb: error: ") and message in err and "Traceback" not in err, err
    assert not output.exists()


def test_the_other_benchmarks_folder_names_its_target(release, tmp_path, capsys):
    # --target IJBB on IJB-C's folder said only "no file at .../ijbb_name_5pts_score.txt".
    data, model, _ = release
    argv = ["--model", model, "--data-root", data, "--target", "IJBB", "--workers", "0", "--device", "cpu",
            "--output", str(tmp_path / "ijbb.json")]
    assert ijb.main(argv) == 2
    err = capsys.readouterr().err
    meta = os.path.join(data, "meta")
    assert err.endswith(f"ijb: error: no file at {meta}/ijbb_name_5pts_score.txt: {meta} holds IJBC's files "
                        "(ijbc_name_5pts_score.txt): pass --target IJBC\n"), err
    assert not (tmp_path / "ijbb.json").exists()


def test_the_release_is_never_an_output_and_every_unreadable_crop_is_named(release, tmp_path, capsys):
    """--overwrite replaces the run's own outputs, never the release's meta files or crops; crops that
    do not decode are all named after the embedding (one round of fixes), and nothing is scored."""
    data, model, _ = release
    copy = str(tmp_path / "IJBC")
    shutil.copytree(data, copy)
    common = ["--model", model, "--data-root", copy, "--workers", "0", "--device", "cpu", "--overwrite"]
    meta = f"{copy}/meta/ijbc_template_pair_label.txt"
    kept = open(meta).read()
    for flag, path in (("--output", meta), ("--save-features", f"{copy}/meta/ijbc_name_5pts_score.npy"),
                       ("--output", f"{copy}/loose_crop/1.jpg"), ("--plot", f"{copy}/loose_crop/new.png")):
        assert ijb.main(common + [flag, path]) == 2, (flag, path)
        err = capsys.readouterr().err
        assert "one of the files this run reads" in err or "is an image's name in" in err, err
    assert open(meta).read() == kept and os.path.getsize(f"{copy}/loose_crop/1.jpg") > 1000

    for name in ("4.jpg", "7.jpg"):
        with open(f"{copy}/loose_crop/{name}", "wb") as f:
            f.write(b"not a jpeg")
    output = tmp_path / "ijbc.json"
    assert ijb.main(common + ["--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "4.jpg: cannot read the image" in err and "7.jpg: cannot read the image" in err
    assert "ijb: error: 2 image(s) of" in err and "cannot be read: nothing scored" in err and not output.exists()


def test_missing_model_is_an_error_message(release, tmp_path, capsys):
    data, _, _ = release
    assert ijb.main(["--model", str(tmp_path / "none.pt"), "--data-root", data, "--device", "cpu"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["features path is a folder", "features path is a folder without .npy",
                                  "output is a folder", "features .txt exists", "output exists"])
def test_unusable_outputs_are_reported_before_embedding(release, tmp_path, monkeypatch, capsys, case):
    data, model, _ = release

    fail_if_called(monkeypatch, ijb, "embed_images", "embedding started before the outputs were checked")
    output, features = tmp_path / "ijbc.json", tmp_path / "feats.npy"
    if case == "features path is a folder":
        features.mkdir()
    elif case == "features path is a folder without .npy":
        # (it was written as feats.npy beside it, without a word; feats/ as a hidden feats/.npy in it)
        features = tmp_path / "feats"
        features.mkdir()
    elif case == "output is a folder":
        output.mkdir()
    elif case == "features .txt exists":
        (tmp_path / "feats.txt").write_text("the user's notes\n")
    else:
        output.write_text("{}\n")

    def contents():
        return {name: (tmp_path / name).is_dir() or (tmp_path / name).read_text() for name in os.listdir(tmp_path)}

    before = contents()
    argv = ["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu", "--output", str(output),
            "--save-features", str(features)]
    assert ijb.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ijb: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert {"output is a folder": f"{output} is a folder: name a file to write",
            "output exists": "exists: pass --overwrite to replace it",
            "features .txt exists": "exists: pass --overwrite to replace it"}.get(
        case, f"--save-features {features} is a folder: name a .npy or .csv file") in err
    assert contents() == before


def test_features_that_cannot_be_written_still_leave_the_results(release, tmp_path, monkeypatch, capsys):
    data, model, _ = release

    def disk_full(*args, **kwargs):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(ijb, "write_table", disk_full)
    output = tmp_path / "ijbc.json"
    assert ijb.main(["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu",
                     "--output", str(output), "--save-features", str(tmp_path / "feats.npy")]) == 2
    assert "ijb: error: could not write the image features to" in capsys.readouterr().err
    assert json.loads(output.read_text())["target"] == "IJBC"


def test_protocol_option(release, tmp_path, capsys):
    """--protocol 1:N needs no pairs file; without the 1:N lists auto runs 1:1 alone and says so, and
    1:N is an error naming the list; a probe whose subject no gallery holds is a non-mated search in
    both, and leaves insightface's figures uncomputed, as its script stops there."""
    data, model, _ = release
    copy = str(tmp_path / "IJBC")
    shutil.copytree(data, copy)
    os.remove(f"{copy}/meta/ijbc_template_pair_label.txt")
    output = tmp_path / "ijbc.json"
    argv = ["--model", model, "--data-root", copy, "--workers", "0", "--device", "cpu", "--output", str(output)]
    assert ijb.main(argv + ["--protocol", "1:n"]) == 0
    result = json.loads(output.read_text())
    assert result["protocols"] == ["1:N"] and "tar_at_far" not in result and "pairs" not in result["counts"]
    assert result["identification"]["galleries"]["G1"]["templates"] == 3
    printed = capsys.readouterr().out
    assert "1:1 verification" not in printed and "probe templates searched in G1 and G2" in printed
    # auto without the pairs list, the 1:N lists there: 1:N alone, said; --protocol 1:1 names the file.
    assert ijb.main(argv + ["--overwrite"]) == 0
    assert json.loads(output.read_text())["protocols"] == ["1:N"]
    assert "note: 1:N identification only: no 1:1 pairs list" in capsys.readouterr().out
    # A refusal (here the results there already) comes alone: the note on the protocols was printed before it.
    assert ijb.main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith("ijb: error: ") and "exists: pass --overwrite" in printed.err
    assert ijb.main(argv + ["--overwrite", "--protocol", "1:1"]) == 2
    assert "ijb: error: no file at" in capsys.readouterr().err

    shutil.copytree(data, copy, dirs_exist_ok=True)
    probe_list = f"{copy}/meta/ijbc_1N_probe_mixed.csv"
    with open(probe_list) as f:
        text = f.read()
    with open(probe_list, "w") as f:  # the last probe's subject (505) becomes one enrolled nowhere
        f.write(text.replace(f",{SUBJECT_BASE + 5},", ",900,"))
    assert ijb.main(argv + ["--overwrite"]) == 0
    found = json.loads(output.read_text())["identification"]
    assert [g["non_mated_searches"] for g in found["galleries"].values()] == [3, 4]
    assert found["insightface"] == {"gallery": "G1+G2",
                                    "error": "the probes' subject 900 has no gallery template (1 probe has none)"}
    assert "figures (G1+G2 as one gallery) not computed: the probes' subject 900" in capsys.readouterr().out

    os.remove(f"{copy}/meta/ijbc_1N_gallery_G2.csv")
    assert ijb.main(argv + ["--overwrite"]) == 0
    assert "identification" not in json.loads(output.read_text())
    assert "note: 1:1 verification only: no 1:N list " in capsys.readouterr().out
    assert ijb.main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith("ijb: error: ") and "exists: pass --overwrite" in printed.err
    assert ijb.main(argv + ["--overwrite", "--protocol", "1:N"]) == 2  # (it said "no file at" the list alone)
    assert capsys.readouterr().err == (f"ijb: error: no 1:N list {copy}/meta/ijbc_1N_gallery_G2.csv (insightface's "
                                       "updated meta data): get it, or measure 1:1 alone (--protocol 1:1)\n")


def test_saved_features_are_scored_again_without_a_model(release, tmp_path, capsys):
    """--features: an earlier run's --save-features table (.npy + .txt, or .csv), scored again as the
    run that saved it scored it, here under other options; no model is loaded, no image read."""
    data, model, _ = release
    base = ["--data-root", data, "--workers", "0", "--device", "cpu"]
    for table in ("feats.npy", "feats.csv"):
        saved, again = tmp_path / f"saved-{table}.json", tmp_path / f"again-{table}.json"
        assert ijb.main(["--model", model, *base, "--output", str(saved), "--save-features", str(tmp_path / table),
                         "--no-detector-score"]) == 0
        shutil.move(os.path.join(data, "loose_crop"), tmp_path / "crops")  # no image is read
        try:
            assert ijb.main(["--features", str(tmp_path / table), *base, "--output", str(again),
                             "--no-detector-score"]) == 0
        finally:
            shutil.move(tmp_path / "crops", os.path.join(data, "loose_crop"))
        first, second = json.loads(saved.read_text()), json.loads(again.read_text())
        assert second["model"] is None and second["features"] == str(tmp_path / table)
        assert second["options"]["flip"] is None and second["options"]["detector_score"] is False
        assert first["options"]["amp"] == "none" and second["options"]["amp"] is None  # (features_about says it)
        # Where the features came from: written beside the table, and carried into the new results.
        about = json.loads((tmp_path / f"{table}.json").read_text())
        assert second["features_about"] == about
        assert (about["made_by"], about["model"], about["flip"], about["image_size"], about["normalised"],
                about["rows"]) == ("train.ijb", os.path.abspath(model), True, IMAGE_SIZE, False, 36)
        assert f"features from {tmp_path / table} (model {os.path.abspath(model)}, with the mirror, " \
               f"{IMAGE_SIZE}px)" in capsys.readouterr().out
        for key in ("tar_at_far", "threshold_at_far", "identification"):
            if table.endswith(".npy"):
                assert second[key] == first[key], key
            else:  # the CSV keeps 7 significant digits
                assert_close_results(second[key], first[key])
    # Other options than the saving run's.
    assert ijb.main(["--features", str(tmp_path / "feats.npy"), *base, "--output", str(tmp_path / "n.json"),
                     "--protocol", "1:N", "--no-norm-score"]) == 0
    assert "identification" in json.loads((tmp_path / "n.json").read_text())
    assert "note: --workers is not used with --features, which are scored as they are" in capsys.readouterr().err

    # Features of another release, a missing table, and options that make no sense with them.
    (tmp_path / "feats.txt").write_text((tmp_path / "feats.txt").read_text().replace("\n3.jpg\n", "\nx.jpg\n"))
    assert ijb.main(["--features", str(tmp_path / "feats.npy"), *base, "--output", str(tmp_path / "x.json")]) == 2
    assert "has no features for 1 of the 36 images of this release (the first: 3.jpg)" in capsys.readouterr().err
    assert ijb.main(["--features", str(tmp_path / "none.npy"), *base]) == 2
    err = capsys.readouterr().err
    assert "ijb: error: no file at" in err
    assert len(err.splitlines()) == 1, err  # a refusal alone: --workers' note is for a run that goes ahead
    # A table of more images than the release uses (IJB-B's names are some of IJB-C's).
    (tmp_path / "feats.txt").write_text((tmp_path / "feats.txt").read_text().replace("\nx.jpg\n", "\n3.jpg\n"))
    saved_rows = np.load(tmp_path / "feats.npy")
    np.save(tmp_path / "more.npy", np.concatenate([saved_rows, saved_rows[:1]]))
    (tmp_path / "more.txt").write_text((tmp_path / "feats.txt").read_text() + "999.jpg\n")
    assert ijb.main(["--features", str(tmp_path / "more.npy"), *base, "--output", str(tmp_path / "x.json")]) == 2
    assert "has features of 1 images this release does not use (the first: 999.jpg)" in capsys.readouterr().err
    # A table without provenance (another tool's, or an older version's), and one whose provenance
    # describes another table (the .npy replaced by other code): scored, with none.
    np.save(tmp_path / "other.npy", saved_rows[::-1])
    (tmp_path / "other.txt").write_text("".join(f"{n}\n" for n in (tmp_path / "feats.txt").read_text().split()[::-1]))
    assert ijb.main(["--features", str(tmp_path / "other.npy"), *base, "--output", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["features_about"] is None
    np.save(tmp_path / "other.npy", np.concatenate([saved_rows[::-1], saved_rows[::-1]], axis=1))
    shutil.copy(tmp_path / "feats.npy.json", tmp_path / "other.npy.json")
    assert ijb.main(["--features", str(tmp_path / "other.npy"), *base, "--output", str(tmp_path / "o.json"),
                     "--overwrite"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["features_about"] is None
    assert "other.npy.json describes another table than" in capsys.readouterr().err
    # Rewritten with the same counts (the rows reordered): only the digest tells.
    np.save(tmp_path / "other.npy", saved_rows[::-1])
    assert ijb.main(["--features", str(tmp_path / "other.npy"), *base, "--output", str(tmp_path / "o.json"),
                     "--overwrite"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["features_about"] is None
    assert "other.npy.json describes another table than" in capsys.readouterr().err
    # The same files again: the digest matches.
    shutil.copy(tmp_path / "feats.npy", tmp_path / "other.npy")
    shutil.copy(tmp_path / "feats.txt", tmp_path / "other.txt")
    assert ijb.main(["--features", str(tmp_path / "other.npy"), *base, "--output", str(tmp_path / "o.json"),
                     "--overwrite"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["features_about"] == \
        json.loads((tmp_path / "feats.npy.json").read_text())
    assert "note: --workers is not used with --features" in capsys.readouterr().err
    for extra, message in ((["--save-features", str(tmp_path / "y.npy")], "--save-features with --features"),
                           (["--model", model], "not allowed with argument --features"),
                           (["--no-flip"], "--flip/--no-flip with --features"),
                           (["--output", str(tmp_path / "c.png"), "--plot", str(tmp_path / "c.png")],
                            "--output, --save-features and --plot must be different files")):
        with pytest.raises(SystemExit):
            ijb.main(["--features", str(tmp_path / "feats.npy"), *base, *extra])
        err = capsys.readouterr().err
        assert message in err
        assert err.startswith("usage: python -m train.ijb"), err  # not after --workers' note


def assert_close_results(got, expected):
    """Equal JSON results, numbers to 1e-5 (a table written with 7 significant digits)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_close_results(got[key], expected[key])
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    else:
        assert got == expected


def test_read_table_is_write_tables_inverse_and_names_bad_tables(tmp_path):
    from train.embed import read_table, write_table

    rng = np.random.default_rng(0)
    names, values = ["a.jpg", "b c.jpg", 'q"uote.jpg'], rng.normal(size=(3, 4)).astype(np.float32)
    for name in ("t.npy", "t.csv"):
        write_table(str(tmp_path / name), names, values)
        got_names, got = read_table(str(tmp_path / name))
        assert got_names == names and got.shape == (3, 4)
        np.testing.assert_allclose(got, values, rtol=1e-6 if name.endswith(".csv") else 0)
    # Names holding what str.splitlines breaks a line at (a form feed, U+0085, U+2028): a file system allows
    # them and listable_name lets them into a table, whose .txt was then read as more images than rows.
    odd = ["form\x0cfeed.jpg", "next\x85line.jpg", "line\u2028separator.jpg"]
    for name in ("o.npy", "o.csv"):
        write_table(str(tmp_path / name), odd, values)
        assert read_table(str(tmp_path / name))[0] == odd
    (tmp_path / "t.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match=r"t.txt lists 2 images, .*t.npy holds 3 rows"):
        read_table(str(tmp_path / "t.npy"))
    values[1, 2] = np.nan
    write_table(str(tmp_path / "n.npy"), names, values)
    with pytest.raises(ValueError, match=r"the embedding of b c.jpg \(row 2\) is not finite \(1 rows are not\)"):
        read_table(str(tmp_path / "n.npy"))
    (tmp_path / "bad.csv").write_text("image,e0\na.jpg,1\nb.jpg,x\n")
    with pytest.raises(ValueError, match="bad.csv: line 3: expected an image name and 1 numbers"):
        read_table(str(tmp_path / "bad.csv"))
    (tmp_path / "other.csv").write_text("name,value\n")
    with pytest.raises(ValueError, match="line 1: expected the header 'image,e0,e1,...'"):
        read_table(str(tmp_path / "other.csv"))
    (tmp_path / "twice.csv").write_text("image,e0\na.jpg,1\nb.jpg,2\na.jpg,3\n")
    with pytest.raises(ValueError, match=r"twice.csv: a.jpg is listed twice \(rows 1 and 3\)"):
        read_table(str(tmp_path / "twice.csv"))
    (tmp_path / "big.csv").write_text("image,e0\na.jpg,1e300\n")
    with pytest.raises(ValueError, match="the embedding of a.jpg .* is not finite"):
        read_table(str(tmp_path / "big.csv"))
    (tmp_path / "long.csv").write_text("image,e0\na.jpg," + "1" * 200_000 + "\n")
    with pytest.raises(ValueError, match="long.csv: line 2: not readable as CSV"):
        read_table(str(tmp_path / "long.csv"))
    # Written by an editor: a byte-order mark, a blank last line.
    np.save(tmp_path / "ed.npy", np.ones((2, 4), np.float32))
    (tmp_path / "ed.txt").write_bytes("\ufeffa.jpg\nb.jpg\n\n".encode())
    assert read_table(str(tmp_path / "ed.npy"))[0] == ["a.jpg", "b.jpg"]
    # Saved on Windows (CR LF line ends, no "\r" left on a name) or without a last line end: the same names.
    # (The .txt is split at line feeds only; its text mode's universal newlines make a CR LF one first.)
    for text in (b"a.jpg\r\nb.jpg\r\n", b"\xef\xbb\xbfa.jpg\r\nb.jpg", b"a.jpg\nb.jpg"):
        (tmp_path / "ed.txt").write_bytes(text)
        assert read_table(str(tmp_path / "ed.npy"))[0] == ["a.jpg", "b.jpg"], text
    (tmp_path / "ed.txt").write_bytes(b"a.jpg\n\xe9.jpg\n")
    with pytest.raises(ValueError, match="ed.npy: not UTF-8 text"):
        read_table(str(tmp_path / "ed.npy"))
    # Not .npy arrays of numbers.
    (tmp_path / "ed.txt").write_text("a.jpg\nb.jpg\n")
    for content, message in ((b"", "not a .npy array of numbers"), (b"\x93NUMPY", "not a .npy array of numbers")):
        (tmp_path / "ed.npy").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_table(str(tmp_path / "ed.npy"))
    np.savez(tmp_path / "z.npz", np.ones((2, 4)))
    os.replace(tmp_path / "z.npz", tmp_path / "ed.npy")
    with pytest.raises(ValueError, match=r"not a .npy array \(an .npz archive\?\)"):
        read_table(str(tmp_path / "ed.npy"))
    np.save(tmp_path / "ed.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"not a .npy array of numbers \(it holds Python objects\)"):
        read_table(str(tmp_path / "ed.npy"))


@pytest.mark.slow
def test_plot_draws_the_curves(release, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, model, _ = release
    base = ["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu"]
    for name, magic in (("curves.png", b"\x89PNG"), ("curves.pdf", b"%PDF")):
        plot = tmp_path / name
        assert ijb.main([*base, "--output", str(tmp_path / "r.json"), "--plot", str(plot), "--overwrite"]) == 0
        assert plot.read_bytes().startswith(magic) and f"curves: {plot}" in capsys.readouterr().out
    # Kept unless --overwrite, checked before embedding; another format is refused.
    assert ijb.main([*base, "--output", str(tmp_path / "s.json"), "--plot", str(tmp_path / "curves.png")]) == 2
    assert "curves.png" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
    with pytest.raises(SystemExit):
        ijb.main([*base, "--plot", str(tmp_path / "curves.jpg")])
    assert "a .png, .pdf or .svg file" in capsys.readouterr().err


def test_curve_rates_span_what_the_negatives_measure():
    rates = ijb.curve_rates(60)
    assert rates[0] == pytest.approx(1 / 60) and rates[-1] == 1.0 and rates == sorted(rates)
    rows = ijb.tar_at_far(np.r_[np.linspace(0, 1, 60), np.linspace(0.5, 1.5, 20)], np.r_[np.zeros(60, bool),
                                                                                          np.ones(20, bool)], rates)
    assert all(r["tar"] is not None for r in rows)  # every point of the curve is measurable


@pytest.mark.slow
def test_results_are_written_when_the_reader_of_stdout_goes(release, tmp_path):
    """`python -m train.ijb ... | head -1`: the printing stops, the scoring and the results file do not."""
    import subprocess
    import sys

    data, model, _ = release
    output = tmp_path / "ijbc.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is buffered
    # The embedding starts by reading a held file, which comes once the reader has gone: the lines after the
    # first are printed after that, not (on a loaded machine) before it went, when the pipe took them all and
    # nothing was tested. (ijb checks its images are files: a held image would be refused.)
    held = HeldFile(tmp_path / "go", b"go")
    script = ("import sys\nfrom train import ijb\nembed_release = ijb.embed_release\n"
              "def held_back(*args, **kwargs):\n"
              "    with open(sys.argv[1], 'rb') as f:\n        f.read()\n"
              "    return embed_release(*args, **kwargs)\n"
              "ijb.embed_release = held_back\nsys.exit(ijb.main(sys.argv[2:]))\n")
    run = subprocess.Popen([sys.executable, "-c", script, held.path, "--model", model, "--data-root", data, "--workers",
                            "0", "--device", "cpu", "--output", str(output)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with held:
        first = run.stdout.readline()
        held.wait_for_reader(run)  # the embedding, after the first line
        run.stdout.close()  # as `head -1` exits
    _, err = run.communicate(timeout=120)
    assert first.startswith("IJBC: ") and run.returncode == 0 and "Error" not in err, (run.returncode, err)
    assert json.loads(output.read_text())["tar_at_far"]


def test_outputs_in_meta_may_be_replaced_and_a_template_without_weight_gets_a_note(release, tmp_path, capsys):
    """The release's own meta files are refused as outputs, an earlier run's results beside them are
    not; a template whose faces all have zero features is named in a note, whatever the weighting."""
    data, model, _ = release
    copy = str(tmp_path / "IJBC")
    shutil.copytree(data, copy)
    features = tmp_path / "feats.npy"
    assert ijb.main(["--model", model, "--data-root", copy, "--workers", "0", "--device", "cpu", "--output",
                     f"{copy}/meta/ijbc.json", "--save-features", str(features)]) == 0
    argv = ["--features", str(features), "--data-root", copy, "--output", f"{copy}/meta/ijbc.json", "--overwrite"]
    assert ijb.main(argv) == 0
    names, saved = ijb.read_table(str(features))
    protocol = ijb.read_protocol(copy, "IJBC")
    faces = [names.index(protocol.image_names[i]) for i in protocol.face_image[protocol.templates == 100]]
    saved[faces] = 0
    ijb.write_table(str(features), names, saved)
    capsys.readouterr()
    for extra, detector in (([], True), (["--no-detector-score", "--no-norm-score"], False)):
        assert ijb.main(argv + extra) == 0
        err = capsys.readouterr().err
        assert "note: 1 template(s) have no weight (each of their faces has a zero feature" in err
        assert ("--no-detector-score weighs the faces equally" in err) == detector


def test_sigterm_during_the_embedding_is_one_line(release, tmp_path, monkeypatch, capsys):
    import signal

    data, model, _ = release

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the handler raises")

    monkeypatch.setattr(ijb, "embed_images", stopped)
    output = tmp_path / "ijbc.json"
    assert ijb.main(["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu",
                     "--output", str(output)]) == 143
    assert capsys.readouterr().err == "\nijb: stopped by SIGTERM: nothing written\n" and not output.exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # back as it was


def test_amp_autocasts_the_trunk_and_the_features_stay_fp32(release, tmp_path, capsys):
    data, model, _ = release
    features = {}
    for amp in ("none", "bf16"):
        out = tmp_path / f"{amp}.npy"
        assert ijb.main(["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu", "--amp", amp,
                         "--output", str(tmp_path / f"{amp}.json"), "--save-features", str(out)]) == 0
        features[amp] = np.load(out)
        # The results and the features' .json record the autocast the features were made under.
        assert json.loads((tmp_path / f"{amp}.json").read_text())["options"]["amp"] == amp
        assert json.loads((tmp_path / f"{amp}.npy.json").read_text())["amp"] == amp
    assert features["none"].dtype == features["bf16"].dtype == np.float32
    fp32, bf16 = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (features["none"], features["bf16"]))
    assert (fp32 * bf16).sum(axis=1).min() > 0.99
    assert np.abs(fp32 - bf16).max() > 1e-4  # autocast is on
    capsys.readouterr()
    assert ijb.main(["--model", model, "--data-root", data, "--workers", "0", "--device", "cpu", "--amp", "fp16",
                     "--output", str(tmp_path / "fp16.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ijb: error: --amp fp16 on the CPU: torch's fp16 convolutions there run several times slower than "
        "fp32 (r18: some 30x; --amp bf16 autocasts on the CPU)"]
    with pytest.raises(SystemExit):
        ijb.main(["--features", str(tmp_path / "none.npy"), "--amp", "bf16", "--data-root", data])
    assert "--amp with --features: the features are as they were embedded" in capsys.readouterr().err


def test_amp_of_an_onnx_model_is_refused_before_reading_it(release, tmp_path, capsys):
    # The one line alone, as train.embed's: not after the ONNX loader's notes on how the graph is fed.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train import export

    data, model, _ = release
    backbone, settings = checkpoint.load_backbone(model)
    graph = str(tmp_path / "backbone.onnx")
    export.export_onnx(backbone, graph, settings["image_size"])
    capsys.readouterr()
    assert ijb.main(["--model", graph, "--data-root", data, "--workers", "0", "--device", "cpu", "--amp", "bf16",
                     "--output", str(tmp_path / "ijb.json")]) == 2
    said = capsys.readouterr()
    assert said.err.splitlines() == [f"ijb: error: --amp bf16: {graph} is an ONNX model, run as its graph is"], \
        said.err
    assert said.out == "" and not (tmp_path / "ijb.json").exists()
    # Nor after the release's files: refused before they are read (a --data-root that is not there).
    assert ijb.main(["--model", graph, "--data-root", str(tmp_path / "no-release"), "--device", "cpu", "--amp",
                     "bf16", "--output", str(tmp_path / "ijb.json")]) == 2
    said = capsys.readouterr()
    assert said.err.splitlines() == [f"ijb: error: --amp bf16: {graph} is an ONNX model, run as its graph is"], \
        said.err
