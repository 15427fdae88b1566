"""Jobs: queued generation that outlives the connection.

``schemas`` is the contract of ``/jobs``, ``store`` keeps job records and progress in Redis,
``runner`` runs one job on the request flow (plain Python, driven by the task consumer in
deployments/), ``webhooks`` signs and delivers the job object when a job ends.
"""
