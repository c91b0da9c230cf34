"""Loop plugins (see tether.lm.plugins): samplers, injections, schedules of seed methods."""
