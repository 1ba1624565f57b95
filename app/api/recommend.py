from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import RecommendAccess, RecommenderDep
from app.api.errors import documented
from app.schemas import Recommendation, VisitorRecommend
from app.serving import Ranked, Served

router = APIRouter(tags=["recommend"])


def _public(s: Served, user: str | None, ranked: Ranked) -> dict:
    # A dict, not model instances: FastAPI validates the response against `Recommendation` once anyway.
    ids, titles = s.ds.item_ids, s.ds.titles
    items = [{"item": ids[i - 1], "title": titles.get(ids[i - 1]), "score": score} for i, score in ranked]
    return {"model_id": s.id, "user": user, "items": items}


@router.get("/recommend/{user}", dependencies=[RecommendAccess], response_model=Recommendation,
            responses=documented(401, 404, 422))
async def recommend_user(
    user: Annotated[str, Path(max_length=200, description="original user id in the model's dataset")],
    recommender: RecommenderDep,
    model: Annotated[str, Query(min_length=1, max_length=100, description="model id or alias")],
    k: Annotated[int, Query(ge=1, description="how many items; a k past the catalogue's size lists all of it")] = 10,
):
    """Top-k next items for a user: history = the dataset's sequence + events added through the API;
    items in the history are not recommended."""
    s, ranked = await recommender.for_user(model, user, k)
    return _public(s, user, ranked)


@router.post("/recommend", dependencies=[RecommendAccess], response_model=Recommendation,
             responses=documented(401, 404, 413, 422))
async def recommend_visitor(body: VisitorRecommend, recommender: RecommenderDep):
    """Top-k for a visitor without an account, from the item history sent along."""
    s, ranked = await recommender.for_visitor(body.model, body.items, body.k)
    return _public(s, None, ranked)
