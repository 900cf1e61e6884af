"""Detection and instance segmentation: models, data, transforms, COCO evaluation, the `detect` command.

Data are real crops of package data (tests/fixtures/detection/README.md); the slow tests fit a handful of them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops import FrozenBatchNorm2d

from hsresnet.detection import (
    CocoDetection,
    DetectionEvaluator,
    build_detector,
    coco_evaluate,
    detection_transforms,
    voc_dataset,
    voc_to_coco,
)

FIX = Path(__file__).parent / 'fixtures' / 'detection'
NUCLEI = FIX / 'nuclei64'
TINY_BACKBONE = dict(w=16, s=4, channels=(16, 32, 64, 128))
TINY = dict(
    backbone='hs_resnet26',
    backbone_kwargs=TINY_BACKBONE,
    fpn_channels=16,
    box_head_dim=32,
    mask_head_channels=16,
    min_size=64,
    max_size=64,
)


def _nuclei(**kwargs) -> CocoDetection:
    return CocoDetection(NUCLEI / 'annotations' / 'instances_train.json', NUCLEI / 'train', **kwargs)


# ---------------------------------------------------------------- models


@pytest.fixture(scope='module')
def hs_reference() -> nn.Module:
    return build_detector('mask', 3, 'hs_resnet50')


@pytest.mark.parametrize('backbone', ['hs_resnet26', 'resnet50', 'resnet50d', 'res2net50_26w_4s'])
def test_one_builder_for_every_backbone(backbone, hs_reference):
    """HS-ResNet-50 and the timm baselines get the same FPN, RPN and heads; only the body differs."""
    kwargs = {}
    model = build_detector('mask', 3, backbone, backbone_kwargs=kwargs)
    ref = hs_reference
    body = model.backbone.body
    assert list(body.return_layers) == ['layer1', 'layer2', 'layer3', 'layer4']
    assert 'fc' not in dict(body.named_children()) and 'global_pool' not in dict(body.named_children())
    cfg = timm.create_model(backbone, pretrained=False, **kwargs).pretrained_cfg
    assert model.transform.image_mean == list(cfg['mean']) and model.transform.image_std == list(cfg['std'])
    for part in ('backbone.fpn', 'rpn', 'roi_heads.box_head', 'roi_heads.box_predictor', 'roi_heads.mask_head'):
        a, b = model.get_submodule(part), ref.get_submodule(part)
        assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()], part
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()], part


def test_tiny_detectors_predict_boxes_and_masks():
    for kind in ('faster', 'mask'):
        model = build_detector(kind, 2, **TINY, box_detections_per_img=10).eval()
        with torch.no_grad():
            out = model([torch.rand(3, 64, 80), torch.rand(3, 48, 64)])
        assert len(out) == 2 and out[0]['boxes'].shape[1] == 4
        assert ('masks' in out[1]) == (kind == 'mask')
        if kind == 'mask':
            assert out[1]['masks'].shape[-2:] == (48, 64)  # mapped back to the input size


def _save_classifier(path: Path, **kwargs) -> nn.Module:
    model = timm.create_model('hs_resnet26', num_classes=10, **{**TINY_BACKBONE, **kwargs})
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN statistics, so freezing them is visible
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_classification_checkpoint_loads_frozen_bn_trainable_layers(tmp_path):
    clf = _save_classifier(tmp_path / 'clf.safetensors')
    model = build_detector('faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'clf.safetensors'})
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    torch.testing.assert_close(body.conv1.weight, clf.conv1.weight)
    torch.testing.assert_close(body.layer3[0].bn1.running_var, clf.layer3[0].bn1.running_var)
    trainable = {n.split('.')[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {'layer2', 'layer3', 'layer4'}  # torchvision's default with trained weights: 3
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())

    model = build_detector(
        'faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'clf.safetensors'}, trainable_layers=0
    )
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    scratch = build_detector('faster', 2, **TINY)  # from scratch: trainable BN, every stage trains
    assert any(isinstance(m, nn.BatchNorm2d) for m in scratch.backbone.body.modules())
    assert all(p.requires_grad for p in scratch.backbone.body.parameters())


def test_classification_checkpoint_strict_key_check(tmp_path):
    _save_classifier(tmp_path / 'w8.safetensors', w=8)
    with pytest.raises(ValueError, match=r'w8\.safetensors.*shape mismatches \[\w'):
        build_detector('faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'w8.safetensors'})
    clf = _save_classifier(tmp_path / 'ok.safetensors')
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file({k: v for k, v in state.items() if not k.startswith('layer4.1.')}, str(tmp_path / 'missing.safetensors'))
    with pytest.raises(ValueError, match=r'missing keys \[layer4\.1\.'):
        build_detector('faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'missing.safetensors'})
    save_file({**state, 'extra.weight': torch.zeros(1)}, str(tmp_path / 'extra.safetensors'))
    with pytest.raises(ValueError, match=r'unexpected keys \[extra\.weight'):
        build_detector('faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'extra.safetensors'})
    (tmp_path / 'clf.pt').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match=r'clf\.pt: expected a \.safetensors file'):
        build_detector('faster', 2, **{**TINY, 'backbone_checkpoint': tmp_path / 'clf.pt'})
    with pytest.raises(ValueError, match=r"does not take \['box_batch_size'\]"):
        build_detector('faster', 2, **TINY, box_batch_size=64)  # misspelt box_batch_size_per_image
    with pytest.raises(ValueError, match='(?i)unknown backbone'):
        build_detector('faster', 2, 'no_such_net')


# ---------------------------------------------------------------- data


def test_coco_dataset_boxes_polygons_rle_and_negatives():
    ds = _nuclei(masks=True)
    raw = json.loads((NUCLEI / 'annotations' / 'instances_train.json').read_text())
    assert len(ds) == len(raw['images']) == 4 and ds.cat_ids == [7] and ds.class_names == ['nucleus']
    kinds = {
        type(a['segmentation']).__name__
        + str(type(a['segmentation'].get('counts', '')).__name__ if isinstance(a['segmentation'], dict) else '')
        for a in raw['annotations']
    }
    assert kinds == {'list', 'dictlist', 'dictstr'}  # polygons, uncompressed and compressed RLE
    n_boxes = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        assert target['labels'].tolist() == [1] * len(target['boxes'])  # category id 7 -> label 1
        assert target['masks'].shape == (len(target['boxes']), 64, 64) and target['masks'].dtype == torch.uint8
        for box, mask in zip(target['boxes'], target['masks']):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(ys) > 0
            mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(box, mask_box, atol=1.01), (box, mask_box)
        n_boxes += len(target['boxes'])
    assert n_boxes == len(raw['annotations'])
    negatives = [i for i in range(len(ds)) if len(ds[i][1]['boxes']) == 0]
    assert len(negatives) == 1 and ds[negatives[0]][1]['masks'].shape == (0, 64, 64)
    assert len(_nuclei(skip_empty=True)) == 3


def _write(tmp_path: Path, data: dict, name: str = 'ann.json') -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_degenerate_boxes_are_dropped_and_counted(tmp_path, caplog):
    data = json.loads((NUCLEI / 'annotations' / 'instances_train.json').read_text())
    n = len(data['annotations'])
    extra = [[10, 10, 0, 5], [10, 10, 5, 0], [70, 10, 5, 5], [-20, -20, 10, 10]]  # zero area, outside the image
    for k, bbox in enumerate(extra):
        data['annotations'].append({'id': 900 + k, 'image_id': 1, 'category_id': 7, 'bbox': bbox, 'iscrowd': 0})
    data['annotations'].append({'id': 950, 'image_id': 1, 'category_id': 7, 'bbox': [60, 60, 10, 10], 'iscrowd': 0})
    path = _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger='hsresnet.detection'):
        ds = CocoDetection(path, NUCLEI / 'train')
    assert ds.num_dropped == 4
    assert f'{path}: dropped 4 degenerate boxes' in caplog.text
    assert sum(len(a) for a in ds.anns.values()) == n + 1
    clipped = [a for a in ds.anns[1] if a['id'] == 950][0]
    assert clipped['bbox'] == [60.0, 60.0, 4.0, 4.0]  # clipped to the 64x64 image


def test_bad_input_is_a_clear_error_naming_the_file(tmp_path):
    good = json.loads((NUCLEI / 'annotations' / 'instances_train.json').read_text())
    bad = tmp_path / 'broken.json'
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r'broken\.json is not valid JSON'):
        CocoDetection(bad, NUCLEI / 'train')
    with pytest.raises(ValueError, match=r'notcoco\.json is not a COCO annotation file'):
        CocoDetection(_write(tmp_path, {'foo': 1}, 'notcoco.json'), NUCLEI / 'train')

    data = copy.deepcopy(good)
    data['annotations'][0]['category_id'] = 3
    with pytest.raises(ValueError, match=r'cat\.json: annotation \d+ has category_id 3.*known ids: \[7\]'):
        CocoDetection(_write(tmp_path, data, 'cat.json'), NUCLEI / 'train')

    data = copy.deepcopy(good)
    rle = next(a for a in data['annotations'] if isinstance(a['segmentation'], dict))
    rle['segmentation']['size'] = [32, 64]
    with pytest.raises(ValueError, match=r'rle\.json: annotation \d+: its RLE mask has size \[32, 64\]'):
        CocoDetection(_write(tmp_path, data, 'rle.json'), NUCLEI / 'train', masks=True)

    data = copy.deepcopy(good)
    negative = next(img for img in data['images'] if all(a['image_id'] != img['id'] for a in data['annotations']))
    negative.update(width=80, height=80)
    ds = CocoDetection(_write(tmp_path, data, 'size.json'), NUCLEI / 'train')
    with pytest.raises(ValueError, match=rf'{negative["file_name"]} is 64x64 but its entry says 80x80'):
        ds[ds.ids.index(negative['id'])]

    data = copy.deepcopy(good)
    del data['annotations'][0]['segmentation']
    with pytest.raises(ValueError, match=r'noseg\.json: annotation \d+ has no segmentation'):
        CocoDetection(_write(tmp_path, data, 'noseg.json'), NUCLEI / 'train', masks=True)

    xml = tmp_path / 'broken.xml'
    xml.write_text('<annotation><size><width>96</width>')
    with pytest.raises(ValueError, match=r'broken\.xml is not valid XML'):
        voc_to_coco([xml], tmp_path)


def test_flip_moves_image_boxes_and_masks_together():
    plain = _nuclei(masks=True)
    flipped = _nuclei(masks=True, transforms=detection_transforms(True, hflip=1.0, vflip=1.0))
    index = next(i for i in range(len(plain)) if len(plain[i][1]['boxes']))
    (image, target), (fimage, ftarget) = plain[index], flipped[index]
    torch.testing.assert_close(fimage, image.flip(-1).flip(-2))
    torch.testing.assert_close(ftarget['masks'], target['masks'].flip(-1).flip(-2))
    w, h = image.shape[2], image.shape[1]
    expected = torch.stack(
        [w - target['boxes'][:, 2], h - target['boxes'][:, 3], w - target['boxes'][:, 0], h - target['boxes'][:, 1]], 1
    )
    torch.testing.assert_close(ftarget['boxes'], expected)
    assert torch.equal(ftarget['labels'], target['labels'])


def test_voc_layout_becomes_coco():
    ds = voc_dataset(FIX / 'voc', 'train')
    assert len(ds) == 2 and ds.class_names == ['Tree']
    import xml.etree.ElementTree as ET

    for i, xml_name in enumerate(['osbs_0.xml', 'osbs_1.xml']):
        root = ET.parse(FIX / 'voc' / 'Annotations' / xml_name).getroot()
        want = [
            [float(o.find('bndbox').findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')] for o in root.iter('object')
        ]
        image, target = ds[i]
        assert image.shape == (3, 96, 96)
        assert target['boxes'].tolist() == want


# ---------------------------------------------------------------- evaluation


def _pycocotools_stats(gt: dict, dets: list, iou_type: str) -> np.ndarray:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_our_coco_evaluation_matches_pycocotools(iou_type):
    gt = json.loads((FIX / 'coco_eval_gt.json').read_text())
    dets = json.loads((FIX / 'coco_eval_dets.json').read_text())
    ours = coco_evaluate(gt, dets, iou_type)
    ref = _pycocotools_stats(gt, dets, iou_type)
    np.testing.assert_allclose(list(ours.values()), ref, atol=1e-12)
    assert 0.2 < ours['AP'] < 0.95  # a non-trivial score: jittered, missed and false detections


def _outputs_from_results(gt: dict, dets: list) -> tuple:
    """The detector-output form (XYXY tensors, labels 1..K, mask probabilities) of COCO results."""
    from faster_coco_eval.core import mask as mask_utils

    cat_ids = sorted(c['id'] for c in gt['categories'])
    outputs, targets = [], []
    for img in gt['images']:
        mine = [d for d in dets if d['image_id'] == img['id']]
        boxes = torch.tensor(
            [[d['bbox'][0], d['bbox'][1], d['bbox'][0] + d['bbox'][2], d['bbox'][1] + d['bbox'][3]] for d in mine]
        ).reshape(-1, 4)
        masks = np.stack([mask_utils.decode(d['segmentation']) for d in mine]) if mine else np.zeros((0, 64, 64))
        outputs.append(
            {
                'boxes': boxes,
                'labels': torch.tensor([cat_ids.index(d['category_id']) + 1 for d in mine]),
                'scores': torch.tensor([d['score'] for d in mine]),
                'masks': torch.from_numpy(masks).float()[:, None] * 0.9,
            }
        )
        targets.append({'image_id': torch.tensor(img['id'])})
    return outputs, targets, cat_ids


def test_evaluator_converts_detector_outputs():
    gt = json.loads((FIX / 'coco_eval_gt.json').read_text())
    dets = json.loads((FIX / 'coco_eval_dets.json').read_text())
    outputs, targets, cat_ids = _outputs_from_results(gt, dets)
    evaluator = DetectionEvaluator(gt, cat_ids, ('bbox', 'segm'))
    evaluator.update(outputs, targets)
    metrics = evaluator.compute()
    for iou_type in ('bbox', 'segm'):
        ref = _pycocotools_stats(gt, dets, iou_type)
        assert metrics[f'{iou_type}_AP'] == pytest.approx(ref[0], abs=1e-6)
        assert metrics[f'{iou_type}_AP50'] == pytest.approx(ref[1], abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    gt = json.loads((FIX / 'coco_eval_gt.json').read_text())
    dets = json.loads((FIX / 'coco_eval_dets.json').read_text())
    outputs, targets, cat_ids = _outputs_from_results(gt, dets)
    evaluator = DetectionEvaluator(gt, cat_ids, ('bbox', 'segm'))
    mine = [i for i in range(len(outputs)) if i % world == rank] + [0]  # image 0 seen twice (sampler padding)
    evaluator.update([outputs[i] for i in mine], [targets[i] for i in mine])
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps(evaluator.compute()))
    dist.destroy_process_group()


@pytest.mark.slow  # about 25 s: two spawned processes import torch
def test_evaluator_merges_results_over_ranks(tmp_path):
    """Two gloo processes each see half the images (one image on both): all ranks get the single-process numbers."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gt = json.loads((FIX / 'coco_eval_gt.json').read_text())
    dets = json.loads((FIX / 'coco_eval_dets.json').read_text())
    outputs, targets, cat_ids = _outputs_from_results(gt, dets)
    single = DetectionEvaluator(gt, cat_ids, ('bbox', 'segm'))
    single.update(outputs, targets)
    expected = single.compute()
    for rank in range(2):
        assert json.loads((tmp_path / f'rank{rank}.json').read_text()) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- the `detect` command


def _tiny_flags(model: str, data: Path, out: Path) -> list:
    return [
        'detect', 'train', '--model', model, '--data', str(data), '--output', str(out), '--backbone', 'hs_resnet26',
        '--backbone-kwargs', 'w=16', 's=4', 'channels=[16,32,64,128]', '--fpn-channels', '16', '--box-head-dim', '32',
        '--mask-head-channels', '16', '--min-size', '64', '--max-size', '64', '--anchor-sizes', '8', '16', '32', '64',
        '128', '-b', '2', '-j', '0', '--no-progress', '--no-tensorboard', '--threads', '1',
    ]  # fmt: skip


def test_detect_train_eval_predict_resume(tmp_path, capsys):
    from hsresnet.cli import main

    run = tmp_path / 'run'
    assert main(_tiny_flags('maskrcnn_hs_resnet50_fpn', NUCLEI, run) + ['--epochs', '1', '--lr', '0.01']) == 0
    for name in ('last.safetensors', 'last.state.pt', 'model.safetensors', 'metrics.csv', 'summary.json'):
        assert (run / name).is_file(), name
    summary = json.loads((run / 'summary.json').read_text())
    assert {'bbox_AP', 'segm_AP', 'best_segm_AP'} <= set(summary)

    assert (
        main(
            _tiny_flags('maskrcnn_hs_resnet50_fpn', NUCLEI, run)
            + ['--epochs', '2', '--lr', '0.01', '--resume', str(run)]
        )
        == 0
    )
    assert len((run / 'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs

    capsys.readouterr()
    assert (
        main(
            [
                'detect',
                'eval',
                '--checkpoint',
                str(run),
                '--data',
                str(NUCLEI),
                '--output',
                str(tmp_path / 'eval.json'),
                '-j',
                '0',
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / 'eval.json').read_text())
    assert metrics['images'] == 4 and 0 <= metrics['segm_AP'] <= 1 and 'bbox_AP50' in metrics

    pred = tmp_path / 'pred'
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\n truncated')  # an unreadable file among the inputs is skipped, listed
    args = ['detect', 'predict', '--checkpoint', str(run / 'model.safetensors'), str(NUCLEI / 'val'), str(broken)]
    assert main([*args, '--output', str(pred), '--score-thresh', '0.0']) == 0
    result = json.loads((pred / 'predictions.json').read_text())
    records = result['images']
    assert len(records) == 4 and result['classes'] == ['nucleus']
    assert [s['path'] for s in result['skipped']] == [str(broken)] and 'not a readable image' in result['skipped'][0][
        'reason'
    ]
    for rec in records:
        overlay = Image.open(rec['overlay'])
        assert (rec['width'], rec['height']) == (64, 64) and overlay.mode == 'RGB'
        assert overlay.size == (384, 384)  # small images are enlarged (x6) so the labels stay readable
        for det in rec['detections']:
            assert det['label'] == 'nucleus' and 0 <= det['score'] <= 1 and len(det['box_xyxy']) == 4
            assert det['mask_rle']['size'] == [64, 64]

    assert main(['detect', 'validate', '--checkpoint', str(tmp_path / 'nothing'), '--data', str(NUCLEI)]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert main(_tiny_flags('fasterrcnn_hs_resnet50_fpn', tmp_path, tmp_path / 'x') + ['--epochs', '1']) == 2
    assert 'neither' in capsys.readouterr().err  # no COCO or VOC layout there


# ---------------------------------------------------------------- slow: fit a handful of real images


# the CPU demo configuration of docs/detection.md (HS-ResNet-26 with w=8, s=4; narrow heads)
DEMO = ['--backbone-kwargs', 'w=8', 's=4', '--fpn-channels', '64', '--box-head-dim', '256',
        '--mask-head-channels', '64', '--min-size', '128', '--max-size', '128', '--anchor-sizes', '16', '32', '64',
        '128', '256', '--lr', '0.02', '--warmup-epochs', '2', '--sched', 'cosine', '--clip-grad', '10',
        '--seed', '0']  # fmt: skip


def _fit(tmp_path: Path, model: str, data: Path, epochs: int, extra: list) -> tuple:
    """Train on ``data`` and score on the same images; return (loss per epoch, final metrics)."""
    import csv

    from hsresnet.cli import main

    run = tmp_path / model
    flags = _tiny_flags(model, data, run) + DEMO + ['--epochs', str(epochs), '--eval-interval', str(epochs)] + extra
    assert main(flags) == 0
    rows = list(csv.DictReader(open(run / 'metrics.csv')))
    losses, summary = [float(r['train_loss']) for r in rows], json.loads((run / 'summary.json').read_text())
    print(
        f'{model}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; '
        + ', '.join(f'{k} {summary[k]:.3f}' for k in ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50') if k in summary)
    )
    return losses, summary


@pytest.mark.slow
def test_maskrcnn_fits_a_handful_of_real_nuclei(tmp_path):
    """4 real 64x64 nuclei crops (one without nuclei), 40 epochs: measured AP50 0.73 (box) / 0.77 (mask)."""
    losses, summary = _fit(tmp_path, 'maskrcnn_hs_resnet50_fpn', NUCLEI, 40, [])
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary['bbox_AP50'] > 0.3 and summary['segm_AP50'] > 0.3, summary


@pytest.mark.slow
def test_fasterrcnn_fits_a_handful_of_real_tree_crowns(tmp_path):
    """Real 96x96 aerial crops with tree-crown boxes (Pascal VOC)."""
    losses, summary = _fit(tmp_path, 'fasterrcnn_hs_resnet50_fpn', FIX / 'voc', 40, ['--val-split', 'train'])
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary['bbox_AP50'] > 0.3, summary
