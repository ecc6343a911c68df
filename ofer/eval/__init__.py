"""Evaluation: the NoW scorer (`ofer.eval.now`), exact point-to-mesh distances (`ofer.eval.pointmesh`),
cumulative error plots (`ofer.eval.now_plot`) and a synthetic NoW-layout writer (`ofer.eval.now_synthetic`).

Submodules are imported on use (`from ofer.eval.now import score_now`) so that importing `ofer.eval` stays
cheap for other evaluation code living here.
"""
