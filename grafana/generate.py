"""Generate the Grafana dashboards in this folder.

Run `python grafana/generate.py` after changing this file and commit the JSON it
writes: Grafana loads the JSON, and tests/test_dashboards.py fails while the
committed files differ from what this script produces.

Needs grafana-foundation-sdk==1769699379!11.6.0 (the Grafana 11.6 types; an
unpinned install picks an older Grafana line with a higher version epoch).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT_DIR = Path(__file__).resolve().parent
TAG = "anomaly-monitor"

# Every panel and variable reads from the data source the user picks in `$datasource`,
# so the files import without `__inputs` and work with any Prometheus data source.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# NOTE: the dashboards use no field overrides. The JSON Schema of the Grafana 11.6
# dashboard types (grafana-foundation-sdk) types a matcher's `options` and an
# override's `value` as objects, so it rejects the string options that Grafana
# itself writes for `byName` and `byFrameRefID` matchers.


# --- queries ---------------------------------------------------------------------------


def range_query(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)


def instant_query(expr: str, legend: str = "", ref_id: str = "A") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).instant().ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    return query


def table_query(expr: str, ref_id: str = "A") -> prometheus.Dataquery:
    return instant_query(expr, ref_id=ref_id).format(PromQueryFormat.TABLE)


# --- links -----------------------------------------------------------------------------

_ENCODED_VARIABLE = re.compile(r"%24%7B([A-Za-z0-9_.:]+)%7D")


def explore_url(expr: str) -> str:
    """Build a Grafana Explore URL (the `panes` form of Grafana 10 and later) for `expr`.

    The pane JSON is percent-encoded, except `${...}` variables, which Grafana only
    interpolates when they appear literally in the link.
    """
    pane = {
        "datasource": "${datasource}",
        "queries": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
        "range": {"from": "${__from}", "to": "${__to}"},
    }
    encoded = urllib.parse.quote(json.dumps({"a": pane}, separators=(",", ":")), safe="")
    return "/explore?schemaVersion=1&orgId=1&panes=" + _ENCODED_VARIABLE.sub(r"${\1}", encoded)


def data_link(title: str, url: str) -> builder.DashboardLink:
    return builder.DashboardLink(title).type(model.DashboardLinkType.LINK).url(url).target_blank(False)


def dashboards_link() -> builder.DashboardLink:
    """Link to the other dashboards of this product, keeping the time range and variables."""
    return (
        builder.DashboardLink("Anomaly monitor")
        .type(model.DashboardLinkType.DASHBOARDS)
        .tags([TAG])
        .as_dropdown(True)
        .include_vars(True)
        .keep_time(True)
    )


# --- panels ----------------------------------------------------------------------------


def grid(x: int, y: int, w: int, h: int) -> model.GridPos:
    return model.GridPos(h=h, w=w, x=x, y=y)


def thresholds(*steps: tuple[float | None, str]) -> builder.ThresholdsConfig:
    return (
        builder.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def legend(display_mode: common_model.LegendDisplayMode = common_model.LegendDisplayMode.LIST) -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .display_mode(display_mode)
        .placement(common_model.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs([])
    )


def tooltip() -> common.VizTooltipOptions:
    return common.VizTooltipOptions().mode(common_model.TooltipDisplayMode.MULTI).sort(common_model.SortOrder.DESCENDING)


def last_value() -> common.ReduceDataOptions:
    return common.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def stat_panel(
    panel_id: int,
    title: str,
    description: str,
    query: prometheus.Dataquery,
    unit: str,
    steps: builder.ThresholdsConfig,
    position: model.GridPos,
    text_mode: common_model.BigValueTextMode = common_model.BigValueTextMode.VALUE,
) -> stat.Panel:
    return (
        stat.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query)
        .unit(unit)
        .thresholds(steps)
        .color_scheme(builder.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .graph_mode(common_model.BigValueGraphMode.NONE)
        .color_mode(common_model.BigValueColorMode.VALUE)
        .justify_mode(common_model.BigValueJustifyMode.AUTO)
        .text_mode(text_mode)
        .wide_layout(True)
        .show_percent_change(False)
        .percent_change_color_mode(common_model.PercentChangeColorMode.STANDARD)
        .reduce_options(last_value())
        .orientation(common_model.VizOrientation.AUTO)
        .grid_pos(position)
    )


def timeseries_panel(
    panel_id: int,
    title: str,
    description: str,
    queries: list[prometheus.Dataquery],
    unit: str,
    position: model.GridPos,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .legend(legend())
        .tooltip(tooltip())
        .line_width(1)
        .fill_opacity(10)
        .grid_pos(position)
    )
    for query in queries:
        panel = panel.with_target(query)
    return panel


def log_scale() -> common.ScaleDistributionConfig:
    return common.ScaleDistributionConfig().type(common_model.ScaleDistribution.LOG).log(10)


# --- variables -------------------------------------------------------------------------


def datasource_variable() -> builder.DatasourceVariable:
    return builder.DatasourceVariable("datasource").label("Data source").type("prometheus")


def job_variable() -> builder.QueryVariable:
    return (
        builder.QueryVariable("job")
        .label("Job")
        .description("Scrape job of the anomaly monitor.")
        .datasource(DATASOURCE)
        .query("label_values(anomaly_monitor_build_info, job)")
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def detector_variable(multi: bool) -> builder.QueryVariable:
    variable = (
        builder.QueryVariable("detector")
        .label("Detector")
        .datasource(DATASOURCE)
        .query('label_values(anomaly_detector_state{job=~"$job"}, detector)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


def entity_variable() -> builder.QueryVariable:
    return (
        builder.QueryVariable("entity")
        .label("Entity")
        .description("Entity label values joined with '/', as the service exports them in the `entity` label.")
        .datasource(DATASOURCE)
        .query('label_values(anomaly_score{job=~"$job", detector="$detector"}, entity)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def base_dashboard(uid: str, title: str, description: str) -> builder.Dashboard:
    return (
        builder.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .timezone("utc")
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .editable()
        .link(dashboards_link())
    )


# --- overview --------------------------------------------------------------------------

ENTITY_DASHBOARD_UID = "anomaly-entity"

# The ranking divides each score by its own threshold, because raw scores of
# detectors with different signals are not comparable.
RANKED_ENTITIES = 'topk(50, anomaly_score{job=~"$job"} / anomaly_threshold{job=~"$job"})'


def overview_stats() -> list[stat.Panel]:
    return [
        stat_panel(
            1,
            "Monitor replicas up",
            "Replicas of the anomaly monitor that Prometheus scrapes successfully (sum of `up`).",
            instant_query('sum(up{job=~"$job"})'),
            "none",
            thresholds((None, "red"), (1, "green")),
            grid(0, 0, 6, 4),
        ).no_value("0"),
        stat_panel(
            2,
            "Detectors serving",
            "Detectors with a trained model that scores entities, counted once across replicas.",
            instant_query('count(count by (detector) (anomaly_detector_state{job=~"$job", state="serving"} == 1))'),
            "none",
            thresholds((None, "red"), (1, "green")),
            grid(6, 0, 6, 4),
        ).no_value("0"),
        stat_panel(
            3,
            "Anomalous entities",
            "Entities whose current score is above their threshold (`anomaly_detected` is 1).",
            instant_query('count(anomaly_detected{job=~"$job"} == 1)'),
            "none",
            thresholds((None, "green"), (1, "orange")),
            grid(12, 0, 6, 4),
        ).no_value("0"),
        stat_panel(
            4,
            "Age of the last training",
            "Time since the most recent accepted training of any detector.",
            instant_query('time() - max(anomaly_model_trained_timestamp_seconds{job=~"$job"})'),
            "s",
            thresholds((None, "green")),
            grid(18, 0, 6, 4),
        ),
    ]


def ranked_entities_table() -> table.Panel:
    entity_link = (
        f"/d/{ENTITY_DASHBOARD_UID}/anomaly-entity?${{datasource:queryparam}}&${{job:queryparam}}"
        "&var-detector=${__data.fields.detector}&var-entity=${__data.fields.entity}&${__url_time_range}"
    )
    hidden_columns = {"Time": True, "__name__": True, "job": True}
    return (
        table.Panel()
        .id(5)
        .title("Entities ranked by score")
        .description(
            "The 50 entities with the highest score relative to their threshold. A value above 1 "
            "means the score is over the threshold. Click an entity to open its dashboard."
        )
        .datasource(DATASOURCE)
        .with_target(table_query(RANKED_ENTITIES))
        .unit("none")
        .decimals(2)
        .thresholds(thresholds((None, "green"), (1, "red")))
        .frame_index(0)
        .show_header(True)
        .sort_by([common.TableSortByFieldState().display_name("Score / threshold").desc(True)])
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": hidden_columns, "renameByName": {"Value": "Score / threshold"}},
            )
        )
        .data_links([data_link("Open entity dashboard", entity_link)])
        .grid_pos(grid(0, 4, 24, 10))
    )


def overview_scores() -> timeseries.Panel:
    return timeseries_panel(
        6,
        "Score / threshold, top 10 entities",
        "Score divided by threshold over time for the 10 highest entities at each step; 1 is the threshold.",
        [range_query('topk(10, anomaly_score{job=~"$job"} / anomaly_threshold{job=~"$job"})', "{{detector}} {{entity}}")],
        "none",
        grid(0, 14, 24, 9),
    ).thresholds(thresholds((None, "green"), (1, "red"))).thresholds_style(
        common.GraphThresholdsStyleConfig().mode(common_model.GraphThresholdsStyleMode.LINE)
    )


def overview_dashboard() -> builder.Dashboard:
    dashboard = base_dashboard(
        "anomaly-overview",
        "Anomaly monitor / Overview",
        "Whether the anomaly monitor runs, and which entities score highest.",
    )
    dashboard = dashboard.with_variable(datasource_variable()).with_variable(job_variable())
    for panel in overview_stats():
        dashboard = dashboard.with_panel(panel)
    return dashboard.with_panel(ranked_entities_table()).with_panel(overview_scores())


# --- entity ----------------------------------------------------------------------------

ENTITY_SELECTOR = 'job=~"$job", detector="$detector", entity="$entity"'


def signal_explore_url() -> str:
    # Data links only interpolate the `${name}` form, so the selector spells every variable that way.
    expr = (
        'anomaly_signal_contribution{job=~"${job}", detector="${detector}", entity="${entity}", '
        'signal="${__field.labels.signal}"}'
    )
    return explore_url(expr)


def entity_stats() -> list[stat.Panel]:
    return [
        stat_panel(
            1,
            "Score / threshold",
            "Current score divided by the current threshold; above 1 the entity is anomalous.",
            instant_query(f"anomaly_score{{{ENTITY_SELECTOR}}} / anomaly_threshold{{{ENTITY_SELECTOR}}}"),
            "none",
            thresholds((None, "green"), (1, "red")),
            grid(0, 0, 6, 4),
        ).decimals(2),
        stat_panel(
            2,
            "Tail probability now",
            "Probability of a score at least this high under normal behaviour, from the detector's threshold method.",
            instant_query(f"anomaly_tail_probability{{{ENTITY_SELECTOR}}}"),
            "sci",
            thresholds((None, "red"), (0.001, "green")),
            grid(6, 0, 6, 4),
        ),
        stat_panel(
            3,
            "Top signal",
            "The signal with the largest share of the current score.",
            instant_query(f"topk(1, anomaly_signal_contribution{{{ENTITY_SELECTOR}}})", "{{signal}}"),
            "percentunit",
            thresholds((None, "blue")),
            grid(12, 0, 6, 4),
            text_mode=common_model.BigValueTextMode.VALUE_AND_NAME,
        ),
        stat_panel(
            4,
            "Model age",
            "Time since the detector's serving model was trained.",
            instant_query('time() - max(anomaly_model_trained_timestamp_seconds{job=~"$job", detector="$detector"})'),
            "s",
            thresholds((None, "green")),
            grid(18, 0, 6, 4),
        ),
    ]


def entity_score_panel() -> timeseries.Panel:
    return timeseries_panel(
        5,
        "Score and threshold",
        "Window score (mean Mahalanobis distance of the reconstruction errors) against the current threshold.",
        [
            range_query(f"anomaly_score{{{ENTITY_SELECTOR}}}", "score", "A"),
            range_query(f"anomaly_threshold{{{ENTITY_SELECTOR}}}", "threshold", "B"),
        ],
        "none",
        grid(0, 4, 24, 9),
    )


def entity_tail_probability_panel() -> timeseries.Panel:
    return timeseries_panel(
        6,
        "Tail probability",
        "Probability of a score at least this high under normal behaviour (log scale).",
        [range_query(f"anomaly_tail_probability{{{ENTITY_SELECTOR}}}", "tail probability")],
        "sci",
        grid(0, 13, 12, 9),
    ).scale_distribution(log_scale())


def entity_contribution_panel() -> timeseries.Panel:
    return (
        timeseries_panel(
            7,
            "Signal contributions",
            "Each signal's share of the score; the shares sum to 1. The service exports them for the top "
            "entities and for every entity over its threshold, so quiet entities may show no data.",
            [range_query(f"anomaly_signal_contribution{{{ENTITY_SELECTOR}}}", "{{signal}}")],
            "percentunit",
            grid(12, 13, 12, 9),
        )
        .min(0)
        .max(1)
        .stacking(common.StackingConfig().mode(common_model.StackingMode.NORMAL))
        .data_links([data_link("Explore ${__field.labels.signal}", signal_explore_url())])
    )


def entity_contribution_now_panel() -> bargauge.Panel:
    return (
        bargauge.Panel()
        .id(8)
        .title("Signal contributions now")
        .description("Current share of the score per signal. Click a bar to explore that signal.")
        .datasource(DATASOURCE)
        .with_target(instant_query(f"sort_desc(anomaly_signal_contribution{{{ENTITY_SELECTOR}}})", "{{signal}}"))
        .unit("percentunit")
        .min(0)
        .max(1)
        .thresholds(thresholds((None, "blue")))
        .display_mode(common_model.BarGaugeDisplayMode.BASIC)
        .value_mode(common_model.BarGaugeValueMode.COLOR)
        .name_placement(common_model.BarGaugeNamePlacement.AUTO)
        .show_unfilled(True)
        .sizing(common_model.BarGaugeSizing.AUTO)
        .min_viz_width(8)
        .min_viz_height(16)
        .max_viz_height(300)
        .legend(legend())
        .reduce_options(last_value())
        .orientation(common_model.VizOrientation.HORIZONTAL)
        .data_links([data_link("Explore ${__field.labels.signal}", signal_explore_url())])
        .grid_pos(grid(0, 22, 24, 8))
    )


def firing_alerts_annotation() -> builder.AnnotationQuery:
    return (
        builder.AnnotationQuery()
        .name("Anomaly alerts")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("red")
        .expr('ALERTS{alertstate="firing", alertname=~"AnomalyMonitorEntity.+", detector="$detector", entity="$entity"}')
    )


def entity_dashboard() -> builder.Dashboard:
    dashboard = base_dashboard(
        ENTITY_DASHBOARD_UID,
        "Anomaly monitor / Entity",
        "Score, threshold, tail probability and signal contributions of one entity.",
    )
    for variable in (datasource_variable(), job_variable(), detector_variable(multi=False), entity_variable()):
        dashboard = dashboard.with_variable(variable)
    dashboard = dashboard.annotation(firing_alerts_annotation())
    for panel in entity_stats():
        dashboard = dashboard.with_panel(panel)
    return (
        dashboard.with_panel(entity_score_panel())
        .with_panel(entity_tail_probability_panel())
        .with_panel(entity_contribution_panel())
        .with_panel(entity_contribution_now_panel())
    )


# --- monitor health --------------------------------------------------------------------

HEALTH_SELECTOR = 'job=~"$job", detector=~"$detector"'


def health_stats() -> list[stat.Panel]:
    return [
        stat_panel(
            1,
            "Replicas up",
            "Replicas of the anomaly monitor that Prometheus scrapes successfully (sum of `up`).",
            instant_query('sum(up{job=~"$job"})'),
            "none",
            thresholds((None, "red"), (1, "green")),
            grid(0, 0, 6, 4),
        ).no_value("0"),
        stat_panel(
            2,
            "Failed queries in range",
            "Prometheus queries of the selected detectors that failed after retries, over the dashboard's time range.",
            instant_query(f"sum(increase(anomaly_monitor_query_errors_total{{{HEALTH_SELECTOR}}}[$__range]))"),
            "none",
            thresholds((None, "green"), (1, "orange")),
            grid(6, 0, 6, 4),
        ).decimals(0).no_value("0"),
        stat_panel(
            3,
            "Trainings rejected or failed in range",
            "Training runs whose model was rejected by the acceptance checks or that failed.",
            instant_query(
                "sum(increase(anomaly_monitor_training_runs_total"
                f'{{{HEALTH_SELECTOR}, result=~"rejected|failed"}}[$__range]))'
            ),
            "none",
            thresholds((None, "green"), (1, "orange")),
            grid(12, 0, 6, 4),
        ).decimals(0).no_value("0"),
        stat_panel(
            4,
            "Windows skipped in range",
            "Windows that were not scored, for any reason (gaps, new entities, ...).",
            instant_query(f"sum(increase(anomaly_monitor_windows_skipped_total{{{HEALTH_SELECTOR}}}[$__range]))"),
            "none",
            thresholds((None, "green")),
            grid(18, 0, 6, 4),
        ).decimals(0).no_value("0"),
    ]


def cycle_duration_panel() -> timeseries.Panel:
    buckets = f"rate(anomaly_monitor_cycle_duration_seconds_bucket{{{HEALTH_SELECTOR}}}[$__rate_interval])"
    total = f"rate(anomaly_monitor_cycle_duration_seconds_sum{{{HEALTH_SELECTOR}}}[$__rate_interval])"
    count = f"rate(anomaly_monitor_cycle_duration_seconds_count{{{HEALTH_SELECTOR}}}[$__rate_interval])"
    return timeseries_panel(
        5,
        "Cycle duration by phase",
        "Time one scoring cycle spends querying Prometheus and scoring: 90th percentile and mean.",
        [
            range_query(
                f"histogram_quantile(0.9, sum by (le, detector, phase) ({buckets}))", "p90 {{detector}} {{phase}}", "A"
            ),
            range_query(
                f"sum by (detector, phase) ({total}) / sum by (detector, phase) ({count})",
                "mean {{detector}} {{phase}}",
                "B",
            ),
        ],
        "s",
        grid(0, 4, 12, 9),
    )


def query_errors_panel() -> timeseries.Panel:
    return timeseries_panel(
        6,
        "Query errors by reason",
        "Failed Prometheus queries per second, by detector and reason (timeout, connection, http_4xx, "
        "http_5xx, bad_response).",
        [
            range_query(
                "sum by (detector, reason) "
                f"(rate(anomaly_monitor_query_errors_total{{{HEALTH_SELECTOR}}}[$__rate_interval]))",
                "{{detector}} {{reason}}",
            )
        ],
        "reqps",
        grid(12, 4, 12, 9),
    )


def training_runs_panel() -> timeseries.Panel:
    return timeseries_panel(
        7,
        "Training runs per hour",
        "Training runs by result: accepted (the new model serves), rejected (the checks kept the old "
        "model), failed (the run raised an error).",
        [
            range_query(
                "sum by (detector, result) "
                f"(increase(anomaly_monitor_training_runs_total{{{HEALTH_SELECTOR}}}[1h]))",
                "{{detector}} {{result}}",
            )
        ],
        "none",
        grid(0, 13, 12, 9),
    ).draw_style(common_model.GraphDrawStyle.BARS)


def model_age_panel() -> timeseries.Panel:
    return timeseries_panel(
        8,
        "Model age",
        "Age of each serving model against twice its training interval, the limit of the training-stale alert.",
        [
            range_query(
                f"time() - anomaly_model_trained_timestamp_seconds{{{HEALTH_SELECTOR}}}",
                "age {{detector}} {{instance}}",
                "A",
            ),
            range_query(
                f"2 * anomaly_detector_train_interval_seconds{{{HEALTH_SELECTOR}}}",
                "stale limit {{detector}} {{instance}}",
                "B",
            ),
        ],
        "s",
        grid(12, 13, 12, 9),
    )


def condition_number_panel() -> timeseries.Panel:
    return timeseries_panel(
        9,
        "Covariance condition number",
        "Conditioning of the error covariance of each serving model (log scale); very large values "
        "mean nearly collinear reconstruction errors.",
        [
            range_query(
                f"anomaly_model_covariance_condition_number{{{HEALTH_SELECTOR}}}", "{{detector}} {{instance}}"
            )
        ],
        "none",
        grid(0, 22, 8, 9),
    ).scale_distribution(log_scale())


def training_windows_panel() -> timeseries.Panel:
    return timeseries_panel(
        10,
        "Training windows",
        "Windows the last training used, and windows it excluded as abnormal, gappy or in an excluded range.",
        [range_query(f"anomaly_model_training_windows{{{HEALTH_SELECTOR}}}", "{{detector}} {{set}}")],
        "none",
        grid(8, 22, 8, 9),
    )


def training_duration_panel() -> timeseries.Panel:
    return timeseries_panel(
        11,
        "Training duration",
        "How long the training of each serving model took.",
        [range_query(f"anomaly_model_training_duration_seconds{{{HEALTH_SELECTOR}}}", "{{detector}} {{instance}}")],
        "s",
        grid(16, 22, 8, 9),
    )


def windows_skipped_panel() -> timeseries.Panel:
    return timeseries_panel(
        12,
        "Windows skipped by reason",
        "Windows not scored per second, by reason.",
        [
            range_query(
                "sum by (detector, reason) "
                f"(rate(anomaly_monitor_windows_skipped_total{{{HEALTH_SELECTOR}}}[$__rate_interval]))",
                "{{detector}} {{reason}}",
            )
        ],
        "cps",
        grid(0, 31, 12, 8),
    )


def detector_state_table() -> table.Panel:
    return (
        table.Panel()
        .id(13)
        .title("Detector state")
        .description("Current state of each detector on each replica: warming_up, serving or failed.")
        .datasource(DATASOURCE)
        .with_target(table_query(f"anomaly_detector_state{{{HEALTH_SELECTOR}}} == 1"))
        .unit("none")
        .frame_index(0)
        .show_header(True)
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            )
        )
        .grid_pos(grid(12, 31, 12, 8))
    )


def health_dashboard() -> builder.Dashboard:
    dashboard = base_dashboard(
        "anomaly-monitor-health",
        "Anomaly monitor / Health",
        "The anomaly monitor's own health: scoring cycles, queries, training runs and model conditioning.",
    )
    for variable in (datasource_variable(), job_variable(), detector_variable(multi=True)):
        dashboard = dashboard.with_variable(variable)
    for panel in health_stats():
        dashboard = dashboard.with_panel(panel)
    for panel in (
        cycle_duration_panel(),
        query_errors_panel(),
        training_runs_panel(),
        model_age_panel(),
        condition_number_panel(),
        training_windows_panel(),
        training_duration_panel(),
        windows_skipped_panel(),
        detector_state_table(),
    ):
        dashboard = dashboard.with_panel(panel)
    return dashboard


# --- output ----------------------------------------------------------------------------

DASHBOARDS = {
    "anomaly-overview.json": overview_dashboard,
    "anomaly-entity.json": entity_dashboard,
    "anomaly-monitor-health.json": health_dashboard,
}


def to_dict(dashboard: builder.Dashboard) -> dict:
    return json.loads(JSONEncoder(sort_keys=True).encode(dashboard.build()))


def render(dashboard: dict) -> str:
    """Serialise a dashboard exactly as the committed files are written."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_all() -> dict[str, dict]:
    """Return every dashboard as a plain dict, keyed by its file name in this folder."""
    return {file_name: to_dict(build()) for file_name, build in DASHBOARDS.items()}


def main() -> int:
    for file_name, dashboard in build_all().items():
        path = OUTPUT_DIR / file_name
        path.write_text(render(dashboard), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
