#!/bin/bash
cd /work/main
HB=.build-bench/hb-sessions/.build/release/HBSessions
VA=.build-bench/vapor-sessions/.build/release/VaporSessions
O=/tmp/msm-s32g
for round in 1 2 3; do
  if [[ $round != 1 ]]; then
    PLACEMENT=off EP=read scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
    PLACEMENT=off EP=counter scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
    PLACEMENT=on EP=counter scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
  fi
  PLACEMENT=on EP=read MODE=sticky MSM_ARGS="--route b1" scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
  PLACEMENT=on EP=counter MODE=sticky MSM_ARGS="--route b1" scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
  PLACEMENT=on EP=counter MODE=sticky MSM_ARGS="--route b1 --sync-saves" scripts/bench/placement-profile hb=$HB ours=$O 2>&1 | tail -3
  PLACEMENT=on EP=counter MSM_ARGS="--framework vapor" scripts/bench/placement-profile va=$VA ours=$O 2>&1 | tail -3
done
echo done
