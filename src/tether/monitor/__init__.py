"""Health of a run: reads metric dicts, raises alarms. World-agnostic (LM and control)."""

from tether.monitor.alarms import Alarm, Monitor, MonitorConfig

__all__ = ["Alarm", "Monitor", "MonitorConfig"]
