// What the UDP and the TCP round engines share: a round is the uplink phase (workers -> servers),
// then, once everything the uplink sent is resolved (arrived, dropped, or its connection gave up),
// the downlink phase (servers -> workers): a parameter server can only answer a complete uplink.
// With a deadline a phase also ends when it has lasted that long: the receivers stop waiting, and
// what has not arrived by then counts as lost (senders still send it: they do not know).
#pragma once

#include "ns3/core-module.h"

#include <cstdint>
#include <vector>

namespace pl_lossy
{

class TwoPhaseRound
{
  public:
    virtual ~TwoPhaseRound() = default;

    bool finished = false; // both phases are over
    double upSeconds = 0.0;
    double downSeconds = 0.0;

  protected:
    struct Flows
    {
        std::vector<int32_t> src; // host indices, one per flow
        std::vector<int32_t> dst;
    };

    // Keeps both phases' flows and schedules the uplink: from inside the run, because a topology
    // built since the last run has its nodes (their queue discs) initialized by the run's first
    // events, and a TCP connect sends its SYN at once.
    void BeginRound(const int32_t* upSrc,
                    const int32_t* upDst,
                    uint32_t nUp,
                    const int32_t* downSrc,
                    const int32_t* downDst,
                    uint32_t nDown)
    {
        m_flows[0] = {std::vector<int32_t>(upSrc, upSrc + nUp), std::vector<int32_t>(upDst, upDst + nUp)};
        m_flows[1] = {std::vector<int32_t>(downSrc, downSrc + nDown), std::vector<int32_t>(downDst, downDst + nDown)};
        finished = false;
        upSeconds = downSeconds = 0.0;
        ++m_token;
        ns3::Simulator::ScheduleNow(&TwoPhaseRound::Launch, this, 1u);
    }

    // Each phase ends at the latest this long after it starts (zero: no deadline). Set before BeginRound.
    void SetDeadline(ns3::Time deadline)
    {
        m_deadline = deadline;
    }

    // Sends phase `phase` (1: up, 2: down) of `flows`; the engine calls EndPhase when it is resolved.
    virtual void StartPhase(uint32_t phase, const Flows& flows) = 0;

    // The current phase's last packet or transfer was resolved now: start the downlink, or finish.
    void EndPhase()
    {
        double seconds = (ns3::Simulator::Now() - m_start).GetSeconds();
        if (m_phase == 1)
        {
            upSeconds = seconds;
            Launch(2);
        }
        else
        {
            downSeconds = seconds;
            finished = true;
            m_phase = 0; // nothing of this round is expected any more
        }
    }

    uint32_t m_phase = 0; // the phase under way (0: none)
    ns3::Time m_start;    // when it started

  private:
    void Launch(uint32_t phase)
    {
        m_phase = phase;
        m_start = ns3::Simulator::Now();
        if (m_deadline.IsStrictlyPositive())
        {
            ns3::Simulator::Schedule(m_deadline, &TwoPhaseRound::Expire, this, m_token, phase);
        }
        StartPhase(phase, m_flows[phase - 1]);
    }

    // The deadline of `phase` of round instance `token`: end it unless it ended already.
    void Expire(uint64_t token, uint32_t phase)
    {
        if (token == m_token && m_phase == phase)
        {
            EndPhase();
        }
    }

    Flows m_flows[2];
    ns3::Time m_deadline = ns3::Seconds(0);
    uint64_t m_token = 0; // which BeginRound a scheduled deadline belongs to
};

} // namespace pl_lossy
