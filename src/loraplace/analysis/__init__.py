"""Analysis of a study store: statistics across seeds, baseline comparisons, Pareto frontier, figures, reports."""

from loraplace.analysis.core import Comparison, Group, StudyAnalysis, analyze_records, analyze_store
from loraplace.analysis.stats import Paired, Summary, paired, pareto_front, summarize

__all__ = ["Comparison", "Group", "Paired", "StudyAnalysis", "Summary", "analyze_records", "analyze_store", "paired",
           "pareto_front", "summarize"]
