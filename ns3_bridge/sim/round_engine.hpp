// RoundEngine: sends one RPS round (uplink phase, then downlink phase) as paced, sequence-numbered UDP
// packets and records, per packet, when it arrived (or that it did not). Loaded with cppyy.cppdef.
//
// Every host owns one UDP socket. A phase is a list of flows (src host -> dst host, P packets each);
// each sender round-robins over its flows, one packet per serialization time of its link, so the
// sender never outruns its own link and drops happen where a real network drops: at the receiver's
// error model or at a congested queue. Arrival times land in caller-owned int64 arrays (nanoseconds
// since the phase started, -1 = lost) that Python reads as numpy views.
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
    // Marks learning packets (a FlowIdTag as byte tag: it survives every hop and header change).
    static constexpr uint32_t kLearningMark = 0x504c4c53;

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
               int64_t* downArrivals)
    {
        m_round = round;
        m_nPackets = nPackets;
        m_payload.assign(std::max(payloadBytes, kTagBytes), 0);
        m_gap = ns3::Seconds((payloadBytes + kHeaderBytes) * 8.0 / linkRateBps);
        m_arrivalsOf[0] = upArrivals;
        m_arrivalsOf[1] = downArrivals;
        BeginRound(upSrc, upDst, nUp, downSrc, downDst, nDown);
    }

    uint64_t sent = 0;
    uint64_t received = 0;
    uint64_t linkDrops = 0;  // all traffic's
    uint64_t queueDrops = 0; // all traffic's

    void ResetCounters()
    {
        sent = received = linkDrops = queueDrops = 0;
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
        m_flowsOf.assign(m_sockets.size(), {});
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            m_flowsOf[flows.src[f]].push_back({f, static_cast<uint32_t>(flows.dst[f])});
        }
        m_next.assign(m_sockets.size(), 0);
        if (m_toResolve == 0)
        {
            EndPhase();
            return;
        }
        for (uint32_t h = 0; h < m_sockets.size(); ++h)
        {
            if (!m_flowsOf[h].empty())
            {
                ns3::Simulator::ScheduleNow(&RoundEngine::SendNext, this, h);
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

    // Packet k of a sender goes to flow k % nFlows, sequence number k / nFlows: round-robin.
    void SendNext(uint32_t host)
    {
        const auto& flows = m_flowsOf[host];
        uint64_t k = m_next[host]++;
        const Flow& flow = flows[k % flows.size()];
        uint32_t seq = static_cast<uint32_t>(k / flows.size());
        uint32_t tag[4] = {m_round, m_phase, flow.id, seq};
        std::memcpy(m_payload.data(), tag, kTagBytes);
        ns3::Ptr<ns3::Packet> packet =
            ns3::Create<ns3::Packet>(m_payload.data(), static_cast<uint32_t>(m_payload.size()));
        packet->AddByteTag(ns3::FlowIdTag(kLearningMark));
        ++sent;
        if (m_next[host] < static_cast<uint64_t>(flows.size()) * m_nPackets)
        {
            ns3::Simulator::Schedule(m_gap, &RoundEngine::SendNext, this, host);
        }
        // last: a drop at the sender's own queue resolves the packet (and may end the phase) in here
        m_sockets[host]->SendTo(packet,
                                0,
                                ns3::InetSocketAddress(m_addresses[flow.dst], m_port));
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
                continue; // cannot happen (a phase ends when all its packets are resolved), but be safe
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
        if (m_phase != 0 && packet->FindFirstMatchingByteTag(mark) && mark.GetFlowId() == kLearningMark)
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
    std::vector<std::vector<Flow>> m_flowsOf;
    std::vector<uint64_t> m_next;
    std::vector<uint8_t> m_payload;
    uint32_t m_round = 0;
    uint32_t m_nPackets = 0;
    uint64_t m_toResolve = 0;
    int64_t* m_arrivals = nullptr;
    ns3::Time m_gap;
};

} // namespace pl_lossy
