"""A discrete-event simulator of the mesh that drives the production routers, routing view and placement code.

Arrivals, queues, batches and devices are simulated (simulator.workload, simulator.fleet); the choice of replica
(gateway.router), the view it reads (scheduler.service.SchedulerState → gateway.view.LoadView) and the placement of
models (scheduler.placement.PlacementTable) are the real code. Service times come from measurements of the real
engines (benchmarks/service_times.py → simulator/calibration.json).

    python -m simulator --scenario skewed --router ours
"""
