"""The dataset-level great-expectations suite: limits on aggregates, not on rows.

Owns the great-expectations (GX) layer of ``validate``. The row rules are the filters of
:mod:`tempering.filters`, stated once; GX judges what only the whole dataset can show, on the
aggregates the streaming runner (:mod:`tempering.datacheck`) accumulated, so it streams too and
costs one small validation per run whatever the input size:

- per source, the share of rows the filters dropped (``counted_reject_share``, ignoring
  ``reject_share_ignores``) against ``validate.max_reject_share``;
- the SFT truncation rate and end-of-turn-outside-the-mask rate against
  ``validate.tokens.max_truncation_rate`` / ``max_eot_missing_rate``;
- the preference prompt and answer truncation rates against
  ``validate.preference_tokens.max_prompt_truncation_rate`` / ``max_answer_truncation_rate``.

The context is ephemeral (no files, no network), progress bars and info logs off.
"""

from __future__ import annotations

from tempering import TemperingError


def gx_context():
    """An ephemeral great-expectations context (no files, no network) with its progress bars off."""
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _validate(context, name: str, records: list[dict], limits: dict[str, float]) -> dict[str, list[int]]:
    """Validate ``records`` (one dataframe row each) against ``column <= limit`` for every
    ``limits`` entry; returns {column: [indexes of the records over the limit]}."""
    import great_expectations as gx
    import pandas as pd

    df = pd.DataFrame(records)
    suite = gx.ExpectationSuite(name=f"tempering_{name}")
    for column, limit in limits.items():
        suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(
            column=column, max_value=limit, meta={"check": column}))
    asset = context.data_sources.add_pandas(f"tempering_{name}").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    out: dict[str, list[int]] = {}
    for res in result.results:
        check = res.expectation_config.meta["check"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise TemperingError(f"validate: expectation {check} on the {name} aggregates failed to run: "
                                 f"{res.exception_info.get('exception_message')}")
        out[check] = sorted(int(i) for i in res.result.get("unexpected_index_list") or [])
    return out


def dataset_suite(reject_shares: dict[str, float], max_reject_share: float,
                  rates: dict[str, tuple[float | None, float]]) -> tuple[list[str], list[str]]:
    """Run the suite: ``reject_shares`` {source: counted reject share}, ``rates`` {name: (observed
    rate or None when not measured, limit)}. Returns (failed sources in the given order, failed
    rate names in the given order)."""
    context = gx_context()
    paths = list(reject_shares)
    over = _validate(context, "sources", [{"counted_reject_share": reject_shares[p]} for p in paths],
                     {"counted_reject_share": max_reject_share}) if paths else {}
    failed_sources = [paths[i] for i in over.get("counted_reject_share", [])]
    measured = {name: v for name, v in rates.items() if v[0] is not None}
    broken = _validate(context, "rates", [{name: float(v[0]) for name, v in measured.items()}],
                       {name: v[1] for name, v in measured.items()}) if measured else {}
    failed_rates = [name for name in measured if broken.get(name)]
    return failed_sources, failed_rates
