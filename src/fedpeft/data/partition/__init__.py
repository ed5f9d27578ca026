"""Partitioning: which examples each client holds. One module per job:

- `federation.py`: `build_federation` and `partition_pools`, the entry points: they check the
  arguments, load the pools, remove the server's reserved examples and hand each task to its scheme;
- `classification.py`: `partition="task"` (`label_split` class_balanced / natural), `"dirichlet"`
  label skew and `"iid"` for classification and regression tasks;
- `generation.py`: the same partitions for generation tasks, keyed on `GenExample.group`, and the
  regrouping of E2E examples on another MR attribute (`regroup_e2e`);
- `by_client.py`: a dataset's natural partition (`--client-column`), one client per value;
- `dirichlet_cut.py`: LEFF's per-class Dirichlet cut (`partition="dirichlet_cut"`);
- `validation.py`: `hold_out_validation`, a validation set held out of a client's train set;
- `client.py`: `ClientData` (one client's examples) and `label_skew`;
- `common.py`: largest-remainder counts, the server's reserved train examples, class helpers.
"""
