"""HTTP routes, one router per resource. Routes parse and answer; app/services does the work."""
