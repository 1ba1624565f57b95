from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import RecommenderDep, SessionDep, WriteAccess
from app.api.errors import documented
from app.schemas import EventsCreate, EventsPublic
from app.services import events

router = APIRouter(tags=["events"])


@router.post("/users/{user}/events", response_model=EventsPublic, status_code=201, dependencies=[WriteAccess],
             responses=documented(401, 404, 413, 422))
def add_events(user: Annotated[str, Path(min_length=1, max_length=200)], body: EventsCreate, session: SessionDep,
               recommender: RecommenderDep):
    """Append interactions (original item ids, oldest first) to a user's history in one dataset. A user
    unknown to the dataset becomes known through their events."""
    dataset = events.target_dataset(session, body.dataset_id, body.model)
    prepared = recommender.dataset(dataset.fingerprint)
    total = events.append(session, dataset, prepared, user, body.items)
    return EventsPublic(dataset_id=dataset.id, user=user, added=len(body.items), events=total)
