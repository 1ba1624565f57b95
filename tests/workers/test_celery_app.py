"""The Celery app's reliability settings (SPEC §8): what makes a dead worker's message survive."""

from workers.celery_app import QUEUE, TASKS, make_celery
from workers.tasks import BODIES


def test_reliability_settings():
    conf = make_celery("redis://127.0.0.1:1/0").conf
    assert conf.task_acks_late is True  # ack after the task: a worker that dies leaves the message
    assert conf.task_reject_on_worker_lost is True  # a pool process killed mid-task requeues it
    assert conf.worker_prefetch_multiplier == 1  # a worker holds only the message it works on
    assert conf.task_default_queue == QUEUE == "gpu"
    assert conf.task_ignore_result is True and not conf.result_backend  # the database holds results
    assert conf.accept_content == ["json"]  # never pickle


def test_one_task_per_job_kind_on_the_gpu_queue():
    assert set(TASKS) == set(BODIES) == {"prepare", "train", "fisher", "merge", "evaluate"}
    app = make_celery("redis://127.0.0.1:1/0")
    for kind, task in TASKS.items():
        assert task.name == f"recmerge.{kind}"
        assert app.amqp.router.route({}, task.name)["queue"].name == QUEUE
