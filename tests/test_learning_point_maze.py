"""The algorithm learns: the in-process driver on the point-mass U maze, on CPU, in minutes."""
from crl import config as C
from crl import driver
from crl.rollout import random_policy_time_at_goal


def test_time_at_goal_rises_well_above_random_policy():
    cfg = C.load(overrides={
        "env.name": "point_maze_u", "env.num_envs": 64,
        "network.actor.width": 64, "network.critic.width": 64,
        "algo.batch_size": 256, "learner.total_env_steps": 70_000,
    })
    history = driver.train(cfg, num_evals=5, log=print)
    random_tag = random_policy_time_at_goal(cfg.env.name, cfg.episode_length)
    best = max(row["time_at_goal"] for row in history[-3:])
    print(f"random policy time at goal {random_tag:.1f}; learned (best of last 3 evals) {best:.1f}")
    assert best > max(4 * random_tag, 20.0)
    assert best > history[0]["time_at_goal"] + 15        # better than the untrained policy
    assert history[-1]["categorical_accuracy"] > 1.5 / cfg.algo.batch_size   # above chance
