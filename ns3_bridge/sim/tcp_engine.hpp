// TcpRoundEngine: the reliable baseline. One RPS phase as TCP transfers: a fresh connection per
// (sender, receiver) pair and round, each carrying one block; everything arrives, and what differs
// from the lossy UDP phase is when. Loaded into the simulation process with cppyy.cppdef.
//
// Connections are not kept across rounds on purpose: congestion state carried from round to round
// would make a round's outcome depend on the rounds simulated before it, and rounds must be pure
// functions of (settings, seed, round) to be simulated ahead, in parallel and replayed. Senders take
// ephemeral ports: their numbers depend on history, but nothing on a star looks at ports. (Fixed
// ports per destination made a new SYN meet the previous round's connection and get reset.)
#pragma once

#include "ns3/core-module.h"
#include "ns3/internet-module.h"
#include "ns3/network-module.h"

#include <cstdint>
#include <map>
#include <vector>

namespace pl_lossy
{

class TcpRoundEngine
{
  public:
    explicit TcpRoundEngine(uint16_t port)
        : m_port(port)
    {
    }

    void AddHost(ns3::Ptr<ns3::Node> node, ns3::Ipv4Address address)
    {
        uint32_t host = static_cast<uint32_t>(m_nodes.size());
        m_nodes.push_back(node);
        m_addresses.push_back(address);
        m_hostOf[address.Get()] = host;
        ns3::Ptr<ns3::Socket> listener =
            ns3::Socket::CreateSocket(node, ns3::TcpSocketFactory::GetTypeId());
        listener->Bind(ns3::InetSocketAddress(ns3::Ipv4Address::GetAny(), m_port));
        listener->Listen();
        listener->SetAcceptCallback(
            ns3::MakeNullCallback<bool, ns3::Ptr<ns3::Socket>, const ns3::Address&>(),
            ns3::MakeBoundCallback(&TcpRoundEngine::HandleAccept, this, host));
        m_listeners.push_back(listener);
    }

    // Runs one phase until every event drains; returns the time at which the last flow's last byte
    // arrived (seconds since the phase started). `completion` gets each flow's time, -1 if it never
    // completed (a connection that gave up).
    double RunPhase(const int32_t* src,
                    const int32_t* dst,
                    uint32_t nFlows,
                    uint64_t bytesPerFlow,
                    double* completion)
    {
        m_bytesPerFlow = bytesPerFlow;
        m_completion = completion;
        m_received.assign(nFlows, 0);
        m_sent.assign(nFlows, 0);
        m_flowOf.clear();
        m_senders.clear();
        std::fill(completion, completion + nFlows, -1.0);
        m_start = ns3::Simulator::Now();
        m_last = m_start;
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            m_flowOf[{static_cast<uint32_t>(src[f]), static_cast<uint32_t>(dst[f])}] = f;
            ns3::Ptr<ns3::Socket> s =
                ns3::Socket::CreateSocket(m_nodes[src[f]], ns3::TcpSocketFactory::GetTypeId());
            s->Bind();
            s->SetConnectCallback(
                ns3::MakeBoundCallback(&TcpRoundEngine::HandleConnected, this, f),
                ns3::MakeBoundCallback(&TcpRoundEngine::HandleConnectFailed, this, f));
            s->SetSendCallback(ns3::MakeBoundCallback(&TcpRoundEngine::HandleSendSpace, this, f));
            s->Connect(ns3::InetSocketAddress(m_addresses[dst[f]], m_port));
            m_senders.push_back(s);
        }
        ns3::Simulator::Run();
        m_accepted.clear();
        m_senders.clear();
        return (m_last - m_start).GetSeconds();
    }

    uint64_t bytesReceived = 0;
    uint64_t failedConnections = 0;

    void ResetCounters()
    {
        bytesReceived = failedConnections = 0;
    }

  private:
    static void HandleConnected(TcpRoundEngine* self, uint32_t flow, ns3::Ptr<ns3::Socket> s)
    {
        self->Fill(flow, s);
    }

    static void HandleConnectFailed(TcpRoundEngine* self, uint32_t, ns3::Ptr<ns3::Socket>)
    {
        ++self->failedConnections;
    }

    static void HandleSendSpace(TcpRoundEngine* self, uint32_t flow, ns3::Ptr<ns3::Socket> s, uint32_t)
    {
        self->Fill(flow, s);
    }

    // Keep the send buffer full until the block is handed to TCP, then close (FIN after the data).
    void Fill(uint32_t flow, ns3::Ptr<ns3::Socket> s)
    {
        while (m_sent[flow] < m_bytesPerFlow)
        {
            uint32_t room = s->GetTxAvailable();
            if (room == 0)
            {
                return;
            }
            uint64_t left = m_bytesPerFlow - m_sent[flow];
            uint32_t chunk = static_cast<uint32_t>(std::min<uint64_t>({left, room, 65536}));
            int sent = s->Send(ns3::Create<ns3::Packet>(chunk));
            if (sent <= 0)
            {
                return;
            }
            m_sent[flow] += static_cast<uint64_t>(sent);
        }
        s->Close();
    }

    static void HandleAccept(TcpRoundEngine* self, uint32_t host, ns3::Ptr<ns3::Socket> s, const ns3::Address& from)
    {
        uint32_t src = self->m_hostOf[ns3::InetSocketAddress::ConvertFrom(from).GetIpv4().Get()];
        auto it = self->m_flowOf.find({src, host});
        if (it == self->m_flowOf.end())
        {
            return;
        }
        s->SetRecvCallback(ns3::MakeBoundCallback(&TcpRoundEngine::HandleRead, self, it->second));
        self->m_accepted.push_back(s);
    }

    static void HandleRead(TcpRoundEngine* self, uint32_t flow, ns3::Ptr<ns3::Socket> s)
    {
        while (ns3::Ptr<ns3::Packet> p = s->Recv())
        {
            self->m_received[flow] += p->GetSize();
            self->bytesReceived += p->GetSize();
        }
        if (self->m_received[flow] >= self->m_bytesPerFlow && self->m_completion[flow] < 0)
        {
            ns3::Time now = ns3::Simulator::Now();
            self->m_completion[flow] = (now - self->m_start).GetSeconds();
            if (now > self->m_last)
            {
                self->m_last = now;
            }
            s->Close(); // finish the connection inside this phase, so that its port is free next phase
        }
    }

    uint16_t m_port;
    std::vector<ns3::Ptr<ns3::Node>> m_nodes;
    std::vector<ns3::Ipv4Address> m_addresses;
    std::map<uint32_t, uint32_t> m_hostOf;
    std::map<std::pair<uint32_t, uint32_t>, uint32_t> m_flowOf;
    std::vector<ns3::Ptr<ns3::Socket>> m_listeners;
    std::vector<ns3::Ptr<ns3::Socket>> m_senders;
    std::vector<ns3::Ptr<ns3::Socket>> m_accepted;
    std::vector<uint64_t> m_received;
    std::vector<uint64_t> m_sent;
    uint64_t m_bytesPerFlow = 0;
    double* m_completion = nullptr;
    ns3::Time m_start;
    ns3::Time m_last;
};

} // namespace pl_lossy
