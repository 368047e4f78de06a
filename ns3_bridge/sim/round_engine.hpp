// RoundEngine: sends one RPS round (uplink phase, then downlink phase) as paced, sequence-numbered UDP
// packets and records, per packet, when it arrived (or that it did not). Loaded with cppyy.cppdef.
//
// Every host owns one UDP socket. A phase is a list of flows (src host -> dst host, P packets each);
// each sender round-robins over its flows, one packet per serialization time of its link, so the
// sender never outruns its own link and drops happen where a real network drops: at the receiver's
// error model or at a congested queue. Arrival times land in caller-owned int64 arrays (nanoseconds
// since the phase started, -1 = lost) that Python reads as numpy views.
//
// Source drops (the paper's network experiment: learning traffic "allowed to drop" a fraction p):
// with probability sourceDropRate a learning packet is dropped by its sender before it enters the
// fabric, so it frees every link it would have crossed. The sender keeps its pacing slot idle, so
// the learning traffic offers (1 - p) of its line rate over the same phase and the slot's capacity
// goes to other traffic. Which packets are dropped is a hash of (seed, round, phase, flow, sequence):
// the same whatever else the simulation does.
//
// Stragglers: each host's uplink may start later than the phase (startNs: the worker's compute ends
// after the fastest worker's); a deadline still counts from the phase's start.
//
// Start() only schedules: the caller runs the simulator, so other traffic (background flows) shares
// the same run. A phase ends when every packet it sent is resolved, arrived or dropped (see
// two_phase_round.hpp). To tell training packets from other traffic in the drop traces, each
// carries a byte tag.
#pragma once

#include "two_phase_round.hpp"

#include "ns3/core-module.h"
#include "ns3/internet-module.h"
#include "ns3/network-module.h"
#include "ns3/traffic-control-module.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pl_lossy
{

class RoundEngine : public TwoPhaseRound
{
  public:
    // Bytes on the wire per packet beyond the payload: UDP 8 + IPv4 20 + PPP 2.
    static constexpr uint32_t kHeaderBytes = 30;
    // Our header at the front of every payload: round, phase, flow, sequence number.
    static constexpr uint32_t kTagBytes = 16;
    // Marks learning packets (a FlowIdTag as byte tag: it survives every hop and header change);
    // the mark of phase f is kLearningMark + f, so a late packet of an expired phase is told apart.
    static constexpr uint32_t kLearningMark = 0x504c4c50;

    // `tos`: the IPv4 TOS of every learning packet (0: none; the learning class matches on it).
    RoundEngine(uint16_t port, uint8_t tos)
        : m_port(port),
          m_tos(tos)
    {
    }

    void AddHost(ns3::Ptr<ns3::Node> node, ns3::Ipv4Address address)
    {
        ns3::Ptr<ns3::Socket> socket =
            ns3::Socket::CreateSocket(node, ns3::UdpSocketFactory::GetTypeId());
        socket->Bind(ns3::InetSocketAddress(ns3::Ipv4Address::GetAny(), m_port));
        socket->SetRecvCallback(ns3::MakeCallback(&RoundEngine::HandleRead, this));
        if (m_tos != 0)
        {
            socket->SetIpTos(m_tos);
        }
        m_sockets.push_back(socket);
        m_addresses.push_back(address);
    }

    // Packets a receiving interface's error model destroyed.
    void WatchLinkErrors(ns3::Ptr<ns3::NetDevice> device)
    {
        device->TraceConnectWithoutContext("PhyRxDrop",
                                           ns3::MakeCallback(&RoundEngine::OnLinkDrop, this));
    }

    // Packets a full device queue refused.
    void WatchDeviceQueue(ns3::Ptr<ns3::NetDevice> device)
    {
        device->TraceConnectWithoutContext("MacTxDrop",
                                           ns3::MakeCallback(&RoundEngine::OnQueueDrop, this));
    }

    // Packets the traffic-control layer dropped because a device queue without a queue discipline
    // was full (flow control stopped it): this is where incast drops show up with queue_disc=none.
    void WatchTrafficControl(ns3::Ptr<ns3::Node> node)
    {
        node->GetObject<ns3::TrafficControlLayer>()->TraceConnectWithoutContext(
            "TcDrop",
            ns3::MakeCallback(&RoundEngine::OnQueueDrop, this));
    }

    // Packets a queue discipline dropped (its children's drops included).
    void WatchQueueDisc(ns3::Ptr<ns3::QueueDisc> disc)
    {
        disc->TraceConnectWithoutContext("Drop",
                                         ns3::MakeCallback(&RoundEngine::OnQueueDiscDrop, this));
    }

    // Schedules round `round`: the uplink flows (upSrc/upDst, nUp of them) first, the downlink flows
    // when the uplink is over. Each flow is nPackets packets of payloadBytes; `upArrivals` and
    // `downArrivals` (nUp * nPackets and nDown * nPackets int64) receive the arrival times. Run the
    // simulator, then read `finished`, `upSeconds` and `downSeconds`.
    void Start(uint32_t round,
               const int32_t* upSrc,
               const int32_t* upDst,
               uint32_t nUp,
               const int32_t* downSrc,
               const int32_t* downDst,
               uint32_t nDown,
               uint32_t nPackets,
               uint32_t payloadBytes,
               double linkRateBps,
               int64_t* upArrivals,
               int64_t* downArrivals,
               double sourceDropRate,
               uint32_t seed,
               int64_t deadlineNs,
               const int64_t* startNs)
    {
        SetDeadline(ns3::NanoSeconds(deadlineNs));
        m_startNs.assign(startNs, startNs + m_sockets.size());
        m_round = round;
        // P(drop) = threshold / 2^64, compared against a 64-bit hash
        m_dropThreshold = sourceDropRate >= 1.0 ? UINT64_MAX : static_cast<uint64_t>(sourceDropRate * 18446744073709551616.0);
        m_seed = seed;
        m_nPackets = nPackets;
        m_payload.assign(std::max(payloadBytes, kTagBytes), 0);
        m_gap = ns3::Seconds((payloadBytes + kHeaderBytes) * 8.0 / linkRateBps);
        m_arrivalsOf[0] = upArrivals;
        m_arrivalsOf[1] = downArrivals;
        BeginRound(upSrc, upDst, nUp, downSrc, downDst, nDown);
    }

    uint64_t sent = 0;
    uint64_t received = 0;
    uint64_t sourceDrops = 0; // learning packets their senders dropped
    uint64_t late = 0;        // learning packets that arrived after their phase's deadline
    uint64_t linkDrops = 0;  // all traffic's
    uint64_t queueDrops = 0; // all traffic's

    void ResetCounters()
    {
        sent = received = linkDrops = queueDrops = sourceDrops = late = 0;
    }

  private:
    struct Flow
    {
        uint32_t id;
        uint32_t dst;
    };

    void StartPhase(uint32_t phase, const Flows& flows) override
    {
        uint32_t nFlows = static_cast<uint32_t>(flows.src.size());
        m_arrivals = m_arrivalsOf[phase - 1];
        m_toResolve = static_cast<uint64_t>(nFlows) * m_nPackets;
        std::fill(m_arrivals, m_arrivals + m_toResolve, -1);
        auto& flowsOf = m_flowsOf[phase - 1];
        flowsOf.assign(m_sockets.size(), {});
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            flowsOf[flows.src[f]].push_back({f, static_cast<uint32_t>(flows.dst[f])});
        }
        m_next[phase - 1].assign(m_sockets.size(), 0);
        if (m_toResolve == 0)
        {
            EndPhase();
            return;
        }
        for (uint32_t h = 0; h < m_sockets.size(); ++h)
        {
            if (!flowsOf[h].empty())
            {
                // a straggler's uplink starts when its compute ends, after the phase (the fastest's) started
                ns3::Time start = phase == 1 ? ns3::NanoSeconds(m_startNs[h]) : ns3::Seconds(0);
                ns3::Simulator::Schedule(start, &RoundEngine::SendNext, this, phase, h);
            }
        }
    }

    // One learning packet of the current phase arrived or was dropped.
    void Resolve()
    {
        if (--m_toResolve == 0)
        {
            EndPhase();
        }
    }

    // Packet k of a sender goes to flow k % nFlows, sequence number k / nFlows: round-robin. A sender
    // keeps sending its phase's packets after the phase expired (its deadline), as a real one would.
    void SendNext(uint32_t phase, uint32_t host)
    {
        const auto& flows = m_flowsOf[phase - 1][host];
        uint64_t k = m_next[phase - 1][host]++;
        const Flow& flow = flows[k % flows.size()];
        uint32_t seq = static_cast<uint32_t>(k / flows.size());
        bool more = m_next[phase - 1][host] < static_cast<uint64_t>(flows.size()) * m_nPackets;
        if (m_dropThreshold != 0 && DroppedAtSource(phase, flow.id, seq))
        {
            ++sourceDrops;
            if (more)
            {
                ns3::Simulator::Schedule(m_gap, &RoundEngine::SendNext, this, phase, host); // the slot stays idle
            }
            if (phase == m_phase)
            {
                Resolve(); // last: it may end the phase
            }
            return;
        }
        uint32_t tag[4] = {m_round, phase, flow.id, seq};
        std::memcpy(m_payload.data(), tag, kTagBytes);
        ns3::Ptr<ns3::Packet> packet =
            ns3::Create<ns3::Packet>(m_payload.data(), static_cast<uint32_t>(m_payload.size()));
        packet->AddByteTag(ns3::FlowIdTag(kLearningMark + phase));
        ++sent;
        if (more)
        {
            ns3::Simulator::Schedule(m_gap, &RoundEngine::SendNext, this, phase, host);
        }
        // last: a drop at the sender's own queue resolves the packet (and may end the phase) in here
        m_sockets[host]->SendTo(packet,
                                0,
                                ns3::InetSocketAddress(m_addresses[flow.dst], m_port));
    }

    // SplitMix64's finalizer over the packet's identity: a uniform 64-bit draw per packet.
    bool DroppedAtSource(uint32_t phase, uint32_t flow, uint32_t seq) const
    {
        uint64_t x = (static_cast<uint64_t>(m_seed) << 32 | m_round) * 0x9E3779B97F4A7C15ULL;
        x ^= (static_cast<uint64_t>(phase) << 62) ^ (static_cast<uint64_t>(flow) << 32) ^ seq;
        x ^= x >> 30;
        x *= 0xBF58476D1CE4E5B9ULL;
        x ^= x >> 27;
        x *= 0x94D049BB133111EBULL;
        x ^= x >> 31;
        return m_dropThreshold == UINT64_MAX || x < m_dropThreshold;
    }

    void HandleRead(ns3::Ptr<ns3::Socket> socket)
    {
        ns3::Address from;
        uint32_t tag[4];
        while (ns3::Ptr<ns3::Packet> packet = socket->RecvFrom(from))
        {
            if (packet->GetSize() < kTagBytes)
            {
                continue;
            }
            packet->CopyData(reinterpret_cast<uint8_t*>(tag), kTagBytes);
            if (tag[0] != m_round || tag[1] != m_phase || tag[3] >= m_nPackets)
            {
                late += tag[0] == m_round && tag[3] < m_nPackets; // after its phase's deadline
                continue;
            }
            m_arrivals[static_cast<size_t>(tag[2]) * m_nPackets + tag[3]] =
                (ns3::Simulator::Now() - m_start).GetNanoSeconds();
            ++received;
            Resolve();
        }
    }

    void CountDrop(ns3::Ptr<const ns3::Packet> packet)
    {
        ns3::FlowIdTag mark;
        if (m_phase != 0 && packet->FindFirstMatchingByteTag(mark) && mark.GetFlowId() == kLearningMark + m_phase)
        {
            Resolve();
        }
    }

    void OnLinkDrop(ns3::Ptr<const ns3::Packet> packet)
    {
        ++linkDrops;
        CountDrop(packet);
    }

    void OnQueueDrop(ns3::Ptr<const ns3::Packet> packet)
    {
        ++queueDrops;
        CountDrop(packet);
    }

    void OnQueueDiscDrop(ns3::Ptr<const ns3::QueueDiscItem> item)
    {
        ++queueDrops;
        CountDrop(item->GetPacket());
    }

    uint16_t m_port;
    uint8_t m_tos;
    std::vector<ns3::Ptr<ns3::Socket>> m_sockets;
    std::vector<ns3::Ipv4Address> m_addresses;
    int64_t* m_arrivalsOf[2] = {nullptr, nullptr};
    std::vector<std::vector<Flow>> m_flowsOf[2]; // per phase: each sender's flows
    std::vector<uint64_t> m_next[2];              // per phase: each sender's next packet
    std::vector<uint8_t> m_payload;
    std::vector<int64_t> m_startNs; // per host: when its uplink starts, from the phase's start
    uint32_t m_round = 0;
    uint32_t m_seed = 0;
    uint64_t m_dropThreshold = 0;
    uint32_t m_nPackets = 0;
    uint64_t m_toResolve = 0;
    int64_t* m_arrivals = nullptr;
    ns3::Time m_gap;
};

} // namespace pl_lossy
