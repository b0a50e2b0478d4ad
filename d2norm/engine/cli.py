"""Plumbing shared by the tools (``tools/recompute_bn_stats.py``, ``fit_evalnorm.py``, ``tune_example_weight.py``,
``analyze_bn.py``, ``train_net.py``, ...), imported by them as ``tc``: one namespace over the modules split by
concern — :mod:`~d2norm.engine.launch` (arguments, launch, the error-line wrapper), :mod:`~d2norm.engine.tool_io`
(cfg / checkpoint / dataset / output files), :mod:`~d2norm.engine.evaluation` (COCO evaluation),
:mod:`~d2norm.engine.errors`, and the layers' conversion policy (:mod:`d2norm.layers.convert`). The statistics
math lives in :mod:`d2norm.stats`; a tool only wires it to files and flags.
"""
from ..layers.convert import (  # noqa: F401
    BN_NORM_NAMES,
    cfg_with_norm,
    conversion_plan,
    convert_bn_layers,
    registered_norm_names,
)
from .errors import ToolError, empty_dataset_is_a_tool_error  # noqa: F401
from .evaluation import (  # noqa: F401
    add_eval_args,
    eval_dataset,
    evaluate,
    main_metric,
    maybe_evaluate,
    record_before_after,
    same_results,
)
from .launch import (  # noqa: F401
    NumbersThenOverrides,
    base_parser,
    distributed_tool,
    is_main_process,
    launch_main,
    parse_tool_args,
    positive_int,
    run_tool,
    training_parser,
)
from .tool_io import (  # noqa: F401
    FORWARD_MODES,
    claim_outputs,
    first,
    format_table,
    load_cfg,
    load_model,
    load_weights,
    norm_layers_training,
    output_dir,
    prepare_dataset,
    read_cfg,
    report_kept,
    save_checkpoint,
    source_stem,
    test_loader,
    train_style_loader,
    write_json,
)

__all__ = [
    "ToolError", "positive_int", "NumbersThenOverrides", "parse_tool_args", "run_tool", "launch_main",
    "training_parser", "base_parser", "load_cfg", "read_cfg", "prepare_dataset", "load_model", "load_weights",
    "save_checkpoint", "output_dir", "source_stem", "claim_outputs", "train_style_loader", "test_loader",
    "empty_dataset_is_a_tool_error", "evaluate", "main_metric", "convert_bn_layers", "conversion_plan",
    "registered_norm_names", "report_kept", "cfg_with_norm", "write_json", "format_table", "BN_NORM_NAMES",
    "is_main_process", "distributed_tool", "same_results", "FORWARD_MODES", "norm_layers_training", "first",
    "maybe_evaluate", "add_eval_args", "eval_dataset", "record_before_after",
]
