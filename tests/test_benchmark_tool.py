"""tools/analysis/benchmark.py runs and reports what it promises (the numbers themselves are
measurements for docs/benchmark.md, never test assertions)."""
import json
import os.path as osp

from helpers import CONFIGS, run_tool


def test_benchmark_tool_reports_times_ratios_memory_and_accuracy(tmp_path):
    out = tmp_path / 'bench.json'
    run_tool(['analysis/benchmark.py', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
              '--memory', '--with-cp', '--accuracy', '--json', out], cwd=tmp_path)
    row, = json.loads(out.read_text())
    for key in ('forward_ours_s', 'forward_reference_s', 'forward_ratio', 'train_ours_s',
                'train_reference_s', 'train_ratio', 'train_peak_mb_ours', 'train_peak_mb_reference',
                'train_peak_mb_ours_cp', 'with_cp_memory_ratio', 'forward_peak_mb_ours',
                'forward_peak_mb_reference', 'train_rss_mb_ours', 'ours_err_vs_fp64'):
        assert row[key] > 0, key
    assert row['max_abs_diff'] < 1e-4


def test_benchmark_tool_times_a_whole_config(tmp_path):
    out = tmp_path / 'bench.json'
    config = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
    run_tool(['analysis/benchmark.py', '--config', config, '--sizes', '96x128', '--batch', '2',
              '--repeats', '1', '--warmup', '0', '--json', out], cwd=tmp_path)
    row, = json.loads(out.read_text())
    assert row['train_s'] > 0 and row['forward_images_per_s'] > 0
